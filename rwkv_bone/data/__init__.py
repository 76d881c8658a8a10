"""Data: the RWKV World tokenizer, binidx files (reader/writer) and make_data's library logic.

    from rwkv_bone.data.binidx import MMapIndexedDataset, write_binidx, load_masks, magic_prime
    from rwkv_bone.data.tokenizer import WorldTokenizer, load_tokenizer
    from rwkv_bone.data.prepare import PrepareOptions, prepare
"""
from __future__ import annotations

from .binidx import BinIdxWriter, MMapIndexedDataset, load_masks, magic_prime, write_binidx
from .tokenizer import HFTokenizer, WorldTokenizer, load_tokenizer

__all__ = ["BinIdxWriter", "MMapIndexedDataset", "load_masks", "magic_prime", "write_binidx",
           "HFTokenizer", "WorldTokenizer", "load_tokenizer"]

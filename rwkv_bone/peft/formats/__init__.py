"""Adapter file formats, each turned into ONE in-memory description (common.AdapterFile) that
merging and loading consume. The format is recognised by content, not by name:

    a folder, or a file inside one, with adapter_config.json   hf_peft.py   (HF PEFT, RWKV-PEFT 2026)
    a .pth holding "__peft__" metadata                          ours.py      (rwkv-bone)
    any other .pth of named tensors                             rwkv_peft.py (RWKV-PEFT .bone/.disha,
                                                                LoRA, PiSSA, state, mixed files)
"""
from __future__ import annotations

import os

from . import hf_peft, ours, rwkv_peft
from .common import META_KEY, AdapterFile, load_tensor_dict

ADAPTER_FORMATS = ("ours", "peft")


def read_adapter(path: str | os.PathLike, lora_alpha: float | None = None,
                 init_path: str | os.PathLike | None = None) -> AdapterFile:
    """Parse any supported adapter file or folder (see the module docstring)."""
    path = os.fspath(path)
    folder = hf_peft.folder_of(path)
    if folder is not None and os.path.isfile(os.path.join(folder, hf_peft.CONFIG_NAME)):
        return hf_peft.read(path)
    if os.path.isdir(path):
        return hf_peft.read(path)                # says what the folder lacks
    raw = load_tensor_dict(path, "adapter")
    if ours.is_ours(raw):
        return ours.read(path, raw, lora_alpha)
    return rwkv_peft.read(path, raw, lora_alpha, None if init_path is None else os.fspath(init_path))


__all__ = ["ADAPTER_FORMATS", "AdapterFile", "META_KEY", "read_adapter", "hf_peft", "ours", "rwkv_peft"]

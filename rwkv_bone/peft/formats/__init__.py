"""Adapter file formats, each turned into ONE in-memory description (common.AdapterFile) that
merging and loading consume. The format is recognised by content, not by name:

    a folder, or a file inside one, with adapter_config.json   hf_peft.py   (HF PEFT, RWKV-PEFT 2026)
    a .pth holding "__peft__" metadata                          ours.py      (rwkv-bone)
    any other .pth of named tensors                             rwkv_peft.py (RWKV-PEFT .bone/.disha,
                                                                LoRA, PiSSA, state, mixed files)
"""
from __future__ import annotations

import math
import os

from ...errors import UserError
from . import hf_peft, ours, rwkv_peft
from .common import META_KEY, AdapterFile, load_tensor_dict

ADAPTER_FORMATS = ("ours", "peft")


def read_adapter(path: str | os.PathLike, lora_alpha: float | None = None,
                 init_path: str | os.PathLike | None = None) -> AdapterFile:
    """Parse any supported adapter file or folder (see the module docstring); whatever the format,
    a whole model passed as the adapter and NaN/inf adapter tensors are refused."""
    path = os.fspath(path)
    if lora_alpha is not None and not math.isfinite(lora_alpha):
        raise UserError(f"--lora_alpha {lora_alpha} is not a finite number; give the alpha used in training")
    folder = hf_peft.folder_of(path)
    if (folder is not None and os.path.isfile(os.path.join(folder, hf_peft.CONFIG_NAME))) or os.path.isdir(path):
        af = hf_peft.read(path)                  # a folder without its config: says what it lacks
    else:
        raw = load_tensor_dict(path, "adapter")
        if ours.is_ours(raw):
            af = ours.read(path, raw, lora_alpha)
        else:
            _refuse_whole_model(path, raw)
            af = rwkv_peft.read(path, raw, lora_alpha, None if init_path is None else os.fspath(init_path))
    _refuse_non_finite(af)
    return af


def _refuse_whole_model(path: str, raw: dict) -> None:
    """A whole model passed as the adapter would silently replace every base tensor."""
    if "emb.weight" in raw and any(k.endswith(".att.key.weight") for k in raw):
        raise UserError(f"adapter {path} is a whole RWKV-6 model, not an adapter; use it directly as "
                        "the model (--model / --base) or pass the adapter file trained on it")


def _refuse_non_finite(af: AdapterFile) -> None:
    """NaN/inf adapter tensors would silently break the merged model."""
    from ...checkpoint import first_non_finite

    tensors = {f"{n}.{k}": t for n, kinds in af.layers.items() for k, t in kinds.items()}
    bad = first_non_finite({**tensors, **af.states, **af.others})
    if bad is not None:
        raise UserError(f"adapter {af.path} tensor {bad} holds NaN or infinite values (a diverged run?); "
                        "use an adapter saved before the loss became non-finite")


__all__ = ["ADAPTER_FORMATS", "AdapterFile", "META_KEY", "read_adapter", "hf_peft", "ours", "rwkv_peft"]

"""The one loader every tool uses: read a base RWKV-6 checkpoint, fold adapters into it, check the
result is finite, and build the model (generate, eval) or hand back the weights (merge).

    files = read_adapters(paths, lora_alpha, pissa_init)   # every adapter parsed before any merge
    sd = fold_adapters(base_sd, files, describe)           # merged in order, then the finite check
    model = load_model(path, paths, dtype=..., device=...) # the two above + RWKV6.from_state_dict
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError
from .model import RWKV6

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine, or a UserError naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but this PyTorch sees no usable NVIDIA GPU; "
                        "use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported for generation; use cpu or cuda")
    return dev


def default_device_dtype(device: Optional[str], dtype: Optional[str]) -> tuple[str, torch.dtype]:
    """The CLI defaults: cuda when available, else cpu; bf16 on cuda, fp32 on cpu."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dev, DTYPES[dtype or ("bf16" if dev.startswith("cuda") else "fp32")]


def adapter_list(adapter: Optional[str | os.PathLike | Sequence[str]]) -> list:
    """One path or several (None: none) as a list."""
    if isinstance(adapter, (str, bytes)) or hasattr(adapter, "__fspath__"):
        return [adapter]
    return list(adapter or [])


def read_adapters(adapters: Sequence[str], lora_alpha: Optional[float] = None,
                  pissa_init: Optional[str] = None) -> list:
    """Every adapter parsed (rwkv_bone.peft.formats, any format) before anything is merged, so a bad
    second adapter is refused before the slow merge of the first."""
    from .peft.adapter_io import read_adapter_file

    return [read_adapter_file(a, lora_alpha, pissa_init) for a in adapters]


def fold_adapters(sd: dict, files: Sequence, describe: Callable[[str], str]) -> dict:
    """`sd` with each adapter file folded in, in order; a UserError with `describe(key)` when a
    tensor of the result holds NaN or infinite values."""
    from .checkpoint import first_non_finite
    from .peft.adapter_io import merge_state_dict

    for af in files:
        sd = merge_state_dict(sd, af)
    bad = first_non_finite(sd)
    if bad is not None:
        raise UserError(describe(bad))
    return sd


def load_model(path: str, adapter: Optional[str | Sequence[str]] = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               lora_alpha: Optional[float] = None, pissa_init: Optional[str] = None,
               pack: Optional[bool] = None) -> RWKV6:
    """An RWKV-6 model ready for inference, with `adapter` (one path or several, any format that
    rwkv_bone.peft.formats reads: e.g. a Bone/LoRA adapter and a state-tuning file) folded into its
    weights in order, so it runs exactly as fast as the base model (a learned initial state costs
    nothing per token either). The merge is computed in float32 from the wider of the checkpoint's
    and the requested dtype (as merge.py does).

    pack: a CPU model's linears packed for the decode kernel (rwkv_bone.gemv.packed; the same
    products, fewer bytes of traffic: batch 8 decodes ~1.3x faster). None (the default) packs where
    it is free, the weights being the process's own converted copies (fp32 from a bf16 file): in
    place. True also packs weights that are still views of the mapped file (bf16 from a bf16 file),
    into new memory (4.7 s and the model's size in memory at 1.6B on these VMs): for batched
    decoding, which pays that back within its first ~150 batch-8 steps. False packs nothing."""
    dev = resolve_device(device)
    adapters = adapter_list(adapter)
    from .checkpoint import converted_checked, load_state_dict

    if not adapters:
        # One pass over the weights: cast and NaN/inf check together (load_state_dict would check
        # the mapped file first, and the cast read it all again).
        raw = load_state_dict(path, check_finite=False)
        mapped = _keeps_mapped(raw, dtype, dev)
        sd = converted_checked(raw, dtype, dev, os.fspath(path))
        del raw
        return _ready(RWKV6.from_state_dict(sd, dtype=dtype, device=dev), pack, mapped)

    files = read_adapters(adapters, lora_alpha, pissa_init)
    base = load_state_dict(path)
    mapped = _keeps_mapped(base, dtype, dev)
    # bf16 release + fp32 run: merge into fp32 weights, not into bf16 ones rounded again later.
    sd = {k: v.to(torch.promote_types(v.dtype, dtype)) for k, v in base.items()}
    sd = fold_adapters(sd, files, lambda bad: (
        f"folding {', '.join(map(str, adapters))} into {path} gives NaN or infinite values "
        f"in {bad} (adapter values too large, or a wrong --lora_alpha?); check the adapter"))
    return _ready(RWKV6.from_state_dict(sd, dtype=dtype, device=dev), pack, mapped)


def _keeps_mapped(sd: dict, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the model built from the mapped state dict `sd` keeps its (2-D) weights as views of
    the file: already in dtype on device, so nothing converts them into the process's memory."""
    weights = [t for k, t in sd.items() if k.endswith(".weight") and t.dim() == 2]
    return any(t.dtype == dtype and t.device == device for t in weights)


def _ready(model: RWKV6, pack: Optional[bool], mapped: bool) -> RWKV6:
    if pack is None:
        pack = not mapped
    if pack:
        from .gemv.packed import pack_linears

        pack_linears(model, copy=mapped)
    return model.eval()


__all__ = ["DTYPES", "resolve_device", "default_device_dtype", "adapter_list", "read_adapters",
           "fold_adapters", "load_model"]

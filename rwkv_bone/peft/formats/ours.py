"""rwkv-bone's own adapter file: a torch.save'd dict of the trained tensors under peer-compatible keys

    blocks.{i}.{att|ffn}.{name}.bone                 Bone row (in/b, b, b) or col (out/b, b, b)
    blocks.{i}.{att|ffn}.{name}.bone_a / .bone_b     Bone-ab (in/b, b, b) each
    blocks.{i}.{att|ffn}.{name}.lora_A / .lora_B     LoRA/PiSSA/OLoRA (r, in) / (out, r)
    blocks.{i}.{att|ffn}.{name}.init_lora_A / _B     PiSSA/OLoRA initial A0/B0 (peer init-file keys)
    blocks.{i}.{att|ffn}.{name}.miss                 MiSS (r, out), mini (r, mini_r)
    blocks.{i}.att.time_state                        state tuning (H, N, N), official layout
    any other key (time_*, ln*, emb.weight, ...)      a trained base tensor, replacing the base one
plus "__peft__": a JSON string {format, version, method, <the method's settings>, targets,
train_parts, extra}.
"""
from __future__ import annotations

import json
import os

from torch import Tensor

from ...errors import UserError
from ..registry import REGISTRY
from .common import META_KEY, AdapterFile, split_tensors

FORMAT = "rwkv-bone-adapter"


def is_ours(raw: dict) -> bool:
    return META_KEY in raw


def read(path: str, raw: dict, lora_alpha: float | None) -> AdapterFile:
    raw = dict(raw)
    meta_text = raw.pop(META_KEY)
    af = split_tensors(AdapterFile(path=path, meta={}), raw)
    try:
        af.meta = json.loads(meta_text)
    except (TypeError, ValueError):
        raise UserError(f"adapter {path} has an unreadable {META_KEY} entry; re-save it with "
                        "save_adapter") from None
    if not isinstance(af.meta, dict) or af.meta.get("method") not in REGISTRY:
        method = af.meta.get("method") if isinstance(af.meta, dict) else None
        raise UserError(f"adapter {path} names an unknown method {method!r}")
    if lora_alpha is not None and af.meta["method"] == "lora":
        if float(lora_alpha) != float(af.meta["lora_alpha"]):
            raise UserError(f"adapter {path} records lora_alpha={af.meta['lora_alpha']:g}; "
                            f"drop --lora_alpha {lora_alpha:g} (the file's value is used)")
    return af


def write(sd: dict[str, Tensor], config: dict, path: str | os.PathLike, extra_meta: dict | None) -> None:
    """sd: every tensor to save (trained + init factors); config: model.peft_config."""
    from ...atomic import torch_save_atomic

    meta = dict(format=FORMAT, version=1, **config)
    if extra_meta:
        meta["extra"] = extra_meta
    torch_save_atomic({**sd, META_KEY: json.dumps(meta, default=str)}, path)

"""RWKV-PEFT's adapter .pth files (no metadata): the kind is read from the keys and shapes.

    ...{name}.bone or .disha (since Feb 2025), 3-D (in/r, r, r): block-affine "bat" = Bone-row
    ...{name}.bone or .disha, 2-D (r, out):  MiSS ("bone"/"DiSHA" there), y = W x + (sum_c x_c) B
    ...{name}.lora_A (r, in) / .lora_B (out, r): LoRA (alpha is not in the file: pass lora_alpha),
        or PiSSA when init_lora_A/B are present (or come from the separate init file)
    blocks.{i}.att.time_state (H, N, N): state tuning
    anything else (time_*, ln* by default: RWKV-PEFT's train_parts): trained base tensors
"""
from __future__ import annotations

import os

from ...errors import UserError
from .common import AdapterFile, load_tensor_dict, parts_of, split_tensors, targets_of


def read(path: str, raw: dict, lora_alpha: float | None, init_path: str | None) -> AdapterFile:
    raw = {(k[:-len(".disha")] + ".bone" if k.endswith(".disha") else k): v for k, v in raw.items()}
    if init_path is not None:                    # peer PiSSA: A0/B0 live in a separate init file
        init = load_tensor_dict(os.fspath(init_path), "PiSSA init file")
        raw.update({k: v for k, v in init.items() if k.endswith((".init_lora_A", ".init_lora_B"))})
    af = split_tensors(AdapterFile(path=path, meta={}), raw)
    bones = {layer["bone"].dim() for layer in af.layers.values() if "bone" in layer}
    if bones == {2}:                             # MiSS: the (r, out) tensor is our "miss" kind
        for layer in af.layers.values():
            if "bone" in layer:
                layer["miss"] = layer.pop("bone")
    elif len(bones) > 1:
        raise UserError(f"adapter {path} mixes 2-D (MiSS) and 3-D (block-affine) Bone tensors; "
                        "expected one kind per file")
    af.meta = dict(infer_meta(af, lora_alpha), targets=targets_of(af), train_parts=parts_of(af.others),
                   format="rwkv-peft")
    return af


def infer_meta(af: AdapterFile, lora_alpha: float | None) -> dict:
    """Method and settings of a file without metadata, from its tensor kinds and shapes."""
    kinds = {k for layer in af.layers.values() for k in layer}
    first = lambda kind: next(layer[kind] for layer in af.layers.values() if kind in layer)  # noqa: E731
    if "miss" in kinds:
        return dict(method="miss", miss_r=first("miss").shape[0], miss_mode="default", miss_mini_r=None)
    if "bone" in kinds:
        return dict(method="bone", bone_mode="row", bone_b=first("bone").shape[-1])
    if "bone_a" in kinds:
        return dict(method="bone", bone_mode="ab", bone_b=first("bone_a").shape[-1])
    if "lora_A" in kinds:
        r = first("lora_A").shape[0]
        if "init_lora_A" in kinds:
            return dict(method="pissa", lora_r=r, lora_alpha=float(r))
        if lora_alpha is None:
            raise UserError(f"adapter {af.path} holds LoRA tensors without rwkv-bone metadata, so "
                            "its scale alpha/r is unknown; pass --lora_alpha with the value used in "
                            "training (for PiSSA pass --pissa_init with its init file instead)")
        return dict(method="lora", lora_r=r, lora_alpha=float(lora_alpha))
    return dict(method="state" if af.states else "none")

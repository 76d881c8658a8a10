"""Put adapters into an RWKV-6 model, choose what trains, count it, and fold adapters back.

`apply_peft` replaces the chosen nn.Linear modules of every block with adapter wrappers that hold
the same (frozen) weight Parameter, so the base state-dict keys never change, and returns the
names it replaced. Its settings are recorded as `model.peft_config` (a plain dict) so that
adapter files can say how to rebuild the model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import UserError
from ..quant import QuantLinear
from .registry import get_method, layer_types, method_settings

DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output",
                   "ffn.key", "ffn.receptance", "ffn.value")
TRAIN_PARTS = ("time", "ln", "emb", "head")


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: wrapper} for every adapter layer in `model`."""
    types = layer_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def _parse_list(value: Iterable[str] | str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v and v.strip()]


def _check_targets(targets: Iterable[str] | str | None) -> list[str]:
    names = _parse_list(targets) if targets is not None else list(DEFAULT_TARGETS)
    bad = [t for t in names if t not in DEFAULT_TARGETS]
    if bad or not names:
        raise UserError(f"unknown adapter target {bad[0] if bad else '(none given)'!r}; "
                        f"choose among {', '.join(DEFAULT_TARGETS)}")
    return list(dict.fromkeys(names))


def apply_peft(model: nn.Module, method: str, *, targets: Iterable[str] | str | None = None,
               init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
               **options) -> list[str]:
    """Freeze `model`, add the adapters of `method` (rwkv_bone.peft.registry), leave only them trainable.

    options: each method reads the fields of its options class (rwkv_bone/peft/options/: bone
    bone_b, bone_mode; lora / pissa / olora lora_r, lora_alpha, lora_dropout, pissa_r, svd_niter;
    miss miss_r, miss_mode, miss_mini_r; state none), the same names as train.py's flags, and
    its checks refuse bad values; any other method's option is ignored. targets: names such as
    "att.key", "ffn.value" (default all 8; not used by state). init_factors: {layer name: (A0, B0)}
    to rebuild PiSSA/OLoRA residuals from a saved adapter instead of factorising again. Returns the
    names added: wrapped linears ("blocks.0.att.key", ...) or model-level tensors.
    """
    entry = get_method(method)
    if adapter_modules(model) or getattr(model, "peft_config", None) is not None:
        raise UserError("this model already has adapters; load a fresh base model (or merge_peft "
                        "first) before applying another")
    settings = method_settings(method, options)
    names = _check_targets(targets) if entry.wraps_linears else []
    for i, block in enumerate(model.blocks):       # refuse before touching anything
        for target in names:
            lin = block.get_submodule(target)
            qual = f"blocks.{i}.{target}"
            if not isinstance(lin, nn.Linear):
                raise UserError(f"{qual} is a {type(lin).__name__}, not a plain nn.Linear; "
                                "apply adapters to a freshly loaded base model")
            entry.check_layer(qual, lin.out_features, lin.in_features, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for i, block in enumerate(model.blocks):
        for target in names:
            part, attr = target.split(".")
            parent = getattr(block, part)
            qual = f"blocks.{i}.{target}"
            layer = entry.build(getattr(parent, attr), settings, qual, (init_factors or {}).get(qual))
            setattr(parent, attr, layer)
            replaced.append(qual)
    if entry.apply_model is not None:
        replaced += entry.apply_model(model, settings)
    model.peft_config = dict(method=method, targets=names, train_parts=[], **settings)
    return replaced


def trainable_part_params(model: nn.Module, part: str) -> dict[str, nn.Parameter]:
    """{name: Parameter} of one --train_parts group: time (time_*), ln (LayerNorm/GroupNorm),
    emb, head."""
    if part == "time":                             # time_state is state tuning's, not a base tensor
        return {n: p for n, p in model.named_parameters()
                if n.rsplit(".", 1)[-1].startswith("time_") and not n.endswith(".time_state")}
    if part == "ln":
        return {f"{mn}.{pn}" if mn else pn: p for mn, m in model.named_modules()
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for pn, p in m.named_parameters(recurse=False)}
    if part in ("emb", "head"):
        return {f"{part}.{n}": p for n, p in getattr(model, part).named_parameters()}
    raise UserError(f"unknown train part {part!r}; choose among {', '.join(TRAIN_PARTS)}")


def mark_trainable(model: nn.Module, train_parts: Iterable[str] | str | None) -> list[str]:
    """Unfreeze extra parameter groups (see `trainable_part_params`); returns their names."""
    parts = list(dict.fromkeys(_parse_list(train_parts)))
    names = []
    for part in parts:
        for n, p in trainable_part_params(model, part).items():
            p.requires_grad_(True)
            names.append(n)
    if getattr(model, "peft_config", None) is not None:
        model.peft_config["train_parts"] = sorted(set(model.peft_config["train_parts"]) | set(parts))
    return names


def count_trainable(config, method: str, train_parts: Iterable[str] | str = (), **options) -> int:
    """Trainable parameter count of `method` on the architecture `config` (an RWKV6Config or a
    preset name such as "3b"); the model is built on the meta device, so nothing is allocated."""
    from ..config import RWKV6Config
    from ..model import RWKV6

    if isinstance(config, str):
        config = RWKV6Config.preset(config)
    model = RWKV6.from_config(config, device="meta")
    apply_peft(model, method, **options)
    mark_trainable(model, train_parts)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_peft(model: nn.Module) -> list[str]:
    """Fold every adapter into its weight in place (W + delta; PiSSA/OLoRA: W_res + B A) and put
    plain nn.Linear modules back; returns the merged names. The model's keys are then exactly the
    official checkpoint layout again."""
    merged = []
    if getattr(model, "peft_config", {}).get("method") == "state":
        for i, block in enumerate(model.blocks):    # the learned S_0 stays, frozen (official keys)
            block.att.time_state.requires_grad_(False)
            merged.append(f"blocks.{i}.att.time_state")
    for name, layer in adapter_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, layer.merged_linear())
        merged.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return merged


def quantize_frozen(model: nn.Module, quant: str) -> list[str]:
    """Replace the frozen weight of every adapter layer of `model` by a QuantLinear (`layer.qbase`),
    one layer at a time (so the full-precision copy of only one layer exists beside the rest);
    returns the quantised layer names. Call after apply_peft (PiSSA/OLoRA: W_res is quantised)."""
    layers = adapter_modules(model)
    if not layers:
        raise UserError(f"--quant {quant} quantises the frozen weights under adapters, and this model has "
                        "none; apply an adapter (e.g. --peft bone) first")
    for layer in layers.values():
        layer.qbase = QuantLinear(layer.weight, quant, layer.bias)
        layer.weight = None  # the Parameter is dropped: its memory is freed
        layer.bias = None
    return list(layers)

"""Adapter files: save only what was trained, load it back (resume / evaluate), merge it into a
base checkpoint. Every format (formats/: ours, RWKV-PEFT's .pth, HF PEFT folders) is read into one
AdapterFile; what a layer holds and how it merges comes from the method registry (registry.py).

Merge (float32, cast back to the base dtype): W' = the entry's merged(W, settings, tensors), e.g.
Bone W + bone_delta; LoRA W + alpha/r B A; PiSSA/OLoRA W - B0 A0 + B A; MiSS W + tiled M^T.
Learned initial states (blocks.{i}.att.time_state) are added to the base as official keys
(float32), trained base tensors replace the base ones.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..errors import UserError
from .formats import ADAPTER_FORMATS, hf_peft, ours, read_adapter
from .formats.common import META_KEY, AdapterFile
from .inject import adapter_modules, apply_peft, mark_trainable, trainable_part_params
from .registry import get_method

FORMAT = ours.FORMAT


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained tensors only: every adapter tensor plus any other parameter that trains."""
    sd = {}
    for name, layer in adapter_modules(model).items():
        for kind in layer.adapter_names():
            sd[f"{name}.{kind}"] = getattr(layer, kind).detach().cpu()
    for name, p in model.named_parameters():
        if p.requires_grad and name not in sd:
            sd[name] = p.detach().cpu()
    return sd


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_meta: dict | None = None,
                 format: str = "ours") -> None:
    """Write the trained tensors (+ PiSSA/OLoRA init factors and the settings) atomically.

    format "ours": one .pth (formats/ours.py); "peft": an HF PEFT folder (formats/hf_peft.py) that
    PeftModel.from_pretrained loads, for Bone-col (as MiSS "bat"), MiSS and LoRA."""
    from ..atomic import check_writable_dir

    config = getattr(model, "peft_config", None)
    if config is None or not (adapter_modules(model) or config.get("method") == "state"):
        raise UserError("the model has no adapters to save; call apply_peft (or load_adapter) first")
    if format not in ADAPTER_FORMATS:
        raise UserError(f"unknown adapter format {format!r}; choose one of {', '.join(ADAPTER_FORMATS)}")
    check_writable_dir(path, "adapter")
    sd = adapter_state_dict(model)
    for name, layer in adapter_modules(model).items():   # init_* kinds (PiSSA/OLoRA's A0, B0)
        init = layer.init_tensors() if hasattr(layer, "init_tensors") else {}
        sd.update({f"{name}.{kind}": t.detach().cpu() for kind, t in init.items()})
    if format == "peft":
        layers = {name: {k: getattr(layer, k) for k in layer.adapter_names()}
                  for name, layer in adapter_modules(model).items()}
        hf_peft.write(layers, config, path)
        return
    ours.write(sd, config, path, extra_meta)


def read_adapter_file(path: str | os.PathLike, lora_alpha: float | None = None,
                      init_path: str | os.PathLike | None = None) -> AdapterFile:
    """Parse one adapter file or folder of any supported format (see rwkv_bone.peft.formats)."""
    return read_adapter(path, lora_alpha, init_path)


def expected_layer_shapes(meta: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    """{tensor kind: shape} one adapted (out, in) layer must hold under `meta`."""
    return get_method(meta["method"]).layer_shapes(meta, out, n_in)


def check_against_base(af: AdapterFile, base_shapes: dict[str, tuple[int, ...]], what: str,
                       state_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse (one sentence naming the key) an adapter whose tensors do not fit `what`.
    state_shapes: the (H, N, N) every blocks.{i}.att.time_state must have."""
    method = get_method(af.meta["method"]) if af.layers else None
    for name, tensors in af.layers.items():
        wkey = f"{name}.weight"
        if wkey not in base_shapes or len(base_shapes[wkey]) != 2:
            raise UserError(f"adapter {af.path} has tensors for {name} but {what} has no such linear "
                            f"layer ({wkey}); the adapter belongs to a different base model")
        out, n_in = base_shapes[wkey]
        try:
            method.check_layer(wkey, out, n_in, af.meta)
        except UserError as e:
            raise UserError(f"adapter {af.path} does not fit {what}: {e}; the adapter belongs to a "
                            "different base model") from None
        want = method.layer_shapes(af.meta, out, n_in)
        for kind, shape in want.items():
            if kind not in tensors:
                raise UserError(f"adapter {af.path} lacks {name}.{kind}, which a "
                                f"{af.meta['method']} adapter needs; the file is incomplete")
            if tuple(tensors[kind].shape) != shape:
                raise UserError(f"adapter tensor {name}.{kind} has shape {tuple(tensors[kind].shape)} "
                                f"but {what} needs {shape} (from {wkey} {(out, n_in)}); the adapter "
                                "belongs to a different base model or block size")
        extra = set(tensors) - set(want)
        if extra:
            raise UserError(f"adapter {af.path} has unexpected tensor {name}.{sorted(extra)[0]} "
                            f"for a {af.meta['method']} adapter; the file mixes adapter kinds")
    for key, t in af.states.items():
        want = (state_shapes or {}).get(key)
        if want is None:
            raise UserError(f"adapter tensor {key} matches no layer of {what}; the adapter belongs to "
                            "a different model")
        if tuple(t.shape) != want:
            raise UserError(f"adapter tensor {key} has shape {tuple(t.shape)} but {what} needs {want} "
                            "(n_head, head_size, head_size); the adapter belongs to a different base model")
    if af.states and state_shapes and len(af.states) != len(state_shapes):
        missing = sorted(set(state_shapes) - set(af.states))[0]
        raise UserError(f"adapter {af.path} holds learned initial states but not {missing}; a state "
                        "adapter has one for every layer")
    for key, t in af.others.items():
        if key not in base_shapes:
            raise UserError(f"adapter tensor {key} matches nothing in {what}; the adapter belongs "
                            "to a different model")
        if tuple(t.shape) != tuple(base_shapes[key]):
            raise UserError(f"adapter tensor {key} has shape {tuple(t.shape)} but {what} has "
                            f"{tuple(base_shapes[key])}; the adapter belongs to a different base model")


@torch.no_grad()
def merged_weight(weight: Tensor, meta: dict, tensors: dict[str, Tensor]) -> Tensor:
    """W' for one layer, computed in float32 and returned in weight's dtype."""
    w2 = get_method(meta["method"]).merged(weight.float(), meta, {k: v.float() for k, v in tensors.items()})
    return w2.to(weight.dtype)


def _state_shapes(base: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    from ..config import RWKV6Config
    return RWKV6Config.from_state_dict(base).state_shapes()


def merge_state_dict(base: dict[str, Tensor], af: AdapterFile) -> dict[str, Tensor]:
    """A new state dict: base with every adapter folded in, learned initial states added (float32)
    and trained tensors replaced."""
    check_against_base(af, {k: tuple(v.shape) for k, v in base.items()}, "the base checkpoint",
                       _state_shapes(base) if af.states else None)
    out = dict(base)
    for name, tensors in af.layers.items():
        out[f"{name}.weight"] = merged_weight(base[f"{name}.weight"], af.meta, tensors)
    for key, t in af.states.items():
        out[key] = t.float().contiguous()
    for key, t in af.others.items():
        out[key] = t.to(base[key].dtype)
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, lora_alpha: float | None = None,
                 init_path: str | os.PathLike | None = None) -> list[str]:
    """Load an adapter file into `model` (applying the adapters first if the model has none) to
    resume training or evaluate; returns the keys loaded. Every key is checked both ways."""
    af = read_adapter_file(path, lora_alpha, init_path)
    meta = af.meta
    if meta["method"] == "none":
        raise UserError(f"adapter {af.path} holds no adapter tensors; load its tensors as a checkpoint")
    method = get_method(meta["method"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, layer in adapter_modules(model).items():      # wrapped layers: same weight key
        shapes[f"{name}.weight"] = tuple(layer.weight.shape)
    check_against_base(af, shapes, "the model", model.config.state_shapes())
    # Check every key both ways before the model is touched (PiSSA rewrites base weights).
    wrapped = adapter_modules(model)
    has_state = getattr(model, "peft_config", {}).get("method") == "state"
    layer_names = list(wrapped) or ([f"blocks.{i}.{t}" for i in range(len(model.blocks))
                                     for t in meta["targets"]] if method.wraps_linears else [])
    kinds = method.trained_kinds(meta)
    expected = {f"{n}.{k}" for n in layer_names for k in kinds}
    if af.states or meta["method"] == "state":
        expected |= set(model.config.state_shapes())
    for part in meta.get("train_parts", []):
        expected |= set(trainable_part_params(model, part))
    if wrapped or has_state:
        expected |= {n for n, p in model.named_parameters() if p.requires_grad}
    given = {f"{n}.{k}" for n, t in af.layers.items() for k in t if not k.startswith("init_")}
    given |= set(af.others) | set(af.states)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing:
        raise UserError(f"adapter {af.path} lacks {missing[0]}" +
                        (f" and {len(missing) - 1} more" if len(missing) > 1 else "") +
                        " that the model trains; it was saved with other targets or train parts")
    if unexpected:
        raise UserError(f"adapter {af.path} has {unexpected[0]}" +
                        (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") +
                        " that the model does not train; check its targets and train parts")
    if not wrapped and not has_state:
        options = method.options_of(meta)
        factors = {n: (t["init_lora_A"], t["init_lora_B"]) for n, t in af.layers.items()
                   if "init_lora_A" in t}
        apply_peft(model, meta["method"], targets=meta["targets"] or None, init_factors=factors, **options)
        if af.states and meta["method"] != "state":        # a mixed file: adapter + states
            for key in model.add_time_state():
                model.get_parameter(key).requires_grad_(True)
    else:
        have = getattr(model, "peft_config", {})
        for k in ("method", *method.compared_settings(meta)):
            if k in meta and k in have and str(have[k]) != str(meta[k]):
                raise UserError(f"the model's adapters have {k}={have.get(k)!r} but adapter "
                                f"{af.path} has {meta[k]!r}; load it into a fresh base model")
    mark_trainable(model, meta.get("train_parts", []))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sorted(given):
            src = af.others.get(key, af.states.get(key))
            if src is None:
                name, kind = key.rsplit(".", 1)
                src = af.layers[name][kind]
            params[key].copy_(src)
    return sorted(given)


__all__ = ["AdapterFile", "META_KEY", "FORMAT", "adapter_state_dict", "save_adapter", "read_adapter_file",
           "load_adapter", "merge_state_dict", "merged_weight", "check_against_base", "expected_layer_shapes"]

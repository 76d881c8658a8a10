"""Adapter files: save only what was trained, load it back (resume / evaluate), merge it into a
base checkpoint. Our files and the peer project's (RWKV-PEFT) files are read the same way.

A file is a torch.save'd dict of tensors under peer-compatible keys
    blocks.{i}.{att|ffn}.{name}.bone                 Bone row (in/b, b, b) or col (out/b, b, b)
    blocks.{i}.{att|ffn}.{name}.bone_a / .bone_b     Bone-ab (in/b, b, b) each
    blocks.{i}.{att|ffn}.{name}.lora_A / .lora_B     LoRA/PiSSA/OLoRA (r, in) / (out, r)
    blocks.{i}.{att|ffn}.{name}.init_lora_A / _B     PiSSA/OLoRA initial A0/B0 (peer init-file keys)
    any other key (time_*, ln*, emb.weight, ...)      a trained base tensor, replacing the base one
plus, in our files, "__peft__": a JSON string {format, method, bone_mode, bone_b, lora_r,
lora_alpha, targets, train_parts, ...}. Without it (a peer file) the kind is read from the keys:
3-D .bone = block-affine Bone-row, 2-D .bone (b, out) = simplified Bone ("bone"/MiSS mode:
y = W x + (sum_c x_c) bone, i.e. delta[o, c*b + i] = bone[i, o]), lora_A/lora_B = LoRA (its alpha
is not in the file: pass lora_alpha) or PiSSA when init_lora_A/B are present or passed separately.

Merge (float32, cast back to the base dtype): Bone W + bone_delta; LoRA W + alpha/r B A;
PiSSA/OLoRA W - B0 A0 + B A.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UserError
from .bone import bone_delta
from .inject import METHODS, adapter_modules, apply_peft, mark_trainable, trainable_part_params
from .lora import lora_delta

META_KEY = "__peft__"
FORMAT = "rwkv-bone-adapter"
LAYER_RE = re.compile(r"^(blocks\.\d+\.(?:att|ffn)\.\w+)\.(bone|bone_a|bone_b|lora_A|lora_B|init_lora_A|init_lora_B)$")


@dataclass
class AdapterFile:
    """An adapter file, parsed: its settings, per-layer tensors and trained base tensors."""
    path: str
    meta: dict                                   # method, bone_mode, bone_b, lora_r, lora_alpha, ...
    layers: dict[str, dict[str, Tensor]] = field(default_factory=dict)   # layer -> {kind: tensor}
    others: dict[str, Tensor] = field(default_factory=dict)              # trained base tensors


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


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """Write the trained tensors (+ PiSSA/OLoRA init factors and the settings) atomically."""
    from ..cli import check_writable_dir, torch_save_atomic

    config = getattr(model, "peft_config", None)
    if config is None or not adapter_modules(model):
        raise UserError("the model has no adapters to save; call apply_peft (or load_adapter) first")
    check_writable_dir(path, "adapter")
    sd = adapter_state_dict(model)
    if config["method"] in ("pissa", "olora"):
        for name, layer in adapter_modules(model).items():
            sd[f"{name}.init_lora_A"] = layer.init_A.detach().cpu()
            sd[f"{name}.init_lora_B"] = layer.init_B.detach().cpu()
    meta = dict(format=FORMAT, version=1, **config)
    if extra_meta:
        meta["extra"] = extra_meta
    sd[META_KEY] = json.dumps(meta, default=str)
    torch_save_atomic(sd, path)


def _load_tensor_dict(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist (or is not a file); check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{what} {path} is not a readable PyTorch file ({reason}); expected a .pth "
                        "saved with torch.save") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dict of named tensors")
    from ..checkpoint import strip_prefixes
    return strip_prefixes(obj)


def read_adapter_file(path: str | os.PathLike, lora_alpha: float | None = None,
                      init_path: str | os.PathLike | None = None) -> AdapterFile:
    """Parse one of our adapter files or a peer one (see the module docstring)."""
    path = os.fspath(path)
    if lora_alpha is not None and not math.isfinite(lora_alpha):
        raise UserError(f"--lora_alpha {lora_alpha} is not a finite number; give the alpha used in training")
    raw = _load_tensor_dict(path, "adapter")
    meta_text = raw.pop(META_KEY, None)
    bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"adapter {path} has a non-tensor entry {bad[0]!r}; expected a dict of tensors")
    if init_path is not None:                    # peer PiSSA: A0/B0 live in a separate init file
        init = _load_tensor_dict(os.fspath(init_path), "PiSSA init file")
        raw.update({k: v for k, v in init.items() if k.endswith((".init_lora_A", ".init_lora_B"))})
    af = AdapterFile(path=path, meta={})
    for key, t in raw.items():
        m = LAYER_RE.match(key)
        if m:
            af.layers.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            af.others[key] = t
    if not af.layers and not af.others:
        raise UserError(f"adapter {path} holds no tensors; was it saved before training started?")
    _refuse_models_and_non_finite(af, meta_text is not None)
    if meta_text is not None:
        try:
            af.meta = json.loads(meta_text)
        except (TypeError, ValueError):
            raise UserError(f"adapter {path} has an unreadable {META_KEY} entry; re-save it with "
                            "save_adapter") from None
        if af.meta.get("method") not in METHODS:
            raise UserError(f"adapter {path} names an unknown method {af.meta.get('method')!r}")
    else:
        af.meta = _infer_peer_meta(af, lora_alpha)
    if lora_alpha is not None and af.meta["method"] == "lora" and meta_text is not None:
        if float(lora_alpha) != float(af.meta["lora_alpha"]):
            raise UserError(f"adapter {path} records lora_alpha={af.meta['lora_alpha']:g}; "
                            f"drop --lora_alpha {lora_alpha:g} (the file's value is used)")
    return af


def _refuse_models_and_non_finite(af: AdapterFile, ours: bool) -> None:
    """A whole model passed as the adapter would silently replace every base tensor; NaN/inf
    adapter tensors would silently break the merged model."""
    from ..checkpoint import first_non_finite

    if not af.layers and not ours and "emb.weight" in af.others and \
            any(k.endswith(".att.key.weight") for k in af.others):
        raise UserError(f"adapter {af.path} is a whole RWKV-6 model, not an adapter; use it directly as "
                        "the model (--model / --base) or pass the adapter file trained on it")
    bad = first_non_finite({**{f"{n}.{k}": t for n, kinds in af.layers.items() for k, t in kinds.items()},
                            **af.others})
    if bad is not None:
        raise UserError(f"adapter {af.path} tensor {bad} holds NaN or infinite values (a diverged run?); "
                        "use an adapter saved before the loss became non-finite")


def _infer_peer_meta(af: AdapterFile, lora_alpha: float | None) -> dict:
    """Settings of a file without metadata, read from its keys and shapes."""
    kinds = {k for layer in af.layers.values() for k in layer}
    targets = sorted({name.split(".", 2)[2] for name in af.layers})
    meta: dict = dict(targets=targets, train_parts=_parts_of(af.others))
    if "bone" in kinds:
        t = next(layer["bone"] for layer in af.layers.values() if "bone" in layer)
        if t.dim() == 2:                          # simplified Bone: (b, out)
            return dict(meta, method="bone", bone_mode="simple", bone_b=t.shape[0])
        return dict(meta, method="bone", bone_mode="row", bone_b=t.shape[-1])
    if "bone_a" in kinds:
        t = next(layer["bone_a"] for layer in af.layers.values() if "bone_a" in layer)
        return dict(meta, method="bone", bone_mode="ab", bone_b=t.shape[-1])
    if "lora_A" in kinds:
        r = next(layer["lora_A"] for layer in af.layers.values() if "lora_A" in layer).shape[0]
        if "init_lora_A" in kinds:
            return dict(meta, method="pissa", lora_r=r, lora_alpha=float(r))
        if lora_alpha is None:
            raise UserError(f"adapter {af.path} holds LoRA tensors without rwkv-bone metadata, so "
                            "its scale alpha/r is unknown; pass --lora_alpha with the value used in "
                            "training (for PiSSA pass --pissa_init with its init file instead)")
        return dict(meta, method="lora", lora_r=r, lora_alpha=float(lora_alpha))
    return dict(meta, method="none")


def _parts_of(others: dict[str, Tensor]) -> list[str]:
    parts = set()
    for k in others:
        leaf = k.rsplit(".", 1)[-1]
        if leaf.startswith("time_"):
            parts.add("time")
        elif k.startswith("emb."):
            parts.add("emb")
        elif k.startswith("head."):
            parts.add("head")
        elif re.search(r"\.(ln\w*)\.(weight|bias)$", k) or k.startswith("ln_out."):
            parts.add("ln")
    return sorted(parts)


def expected_layer_shapes(meta: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    """{tensor kind: shape} one adapted (out, in) layer must hold under `meta`."""
    method, b = meta["method"], meta.get("bone_b")
    if method == "bone":
        mode = meta.get("bone_mode", "row")
        if mode == "simple":
            return {"bone": (b, out)}
        if mode == "col":
            return {"bone": (out // b, b, b)}
        if mode == "ab":
            return {"bone_a": (n_in // b, b, b), "bone_b": (n_in // b, b, b)}
        return {"bone": (n_in // b, b, b)}
    r = meta["lora_r"]
    shapes = {"lora_A": (r, n_in), "lora_B": (out, r)}
    if method in ("pissa", "olora"):
        shapes.update(init_lora_A=(r, n_in), init_lora_B=(out, r))
    return shapes


def check_against_base(af: AdapterFile, base_shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse (one sentence naming the key) an adapter whose tensors do not fit `what`."""
    for name, tensors in af.layers.items():
        wkey = f"{name}.weight"
        if wkey not in base_shapes or len(base_shapes[wkey]) != 2:
            raise UserError(f"adapter {af.path} has tensors for {name} but {what} has no such linear "
                            f"layer ({wkey}); the adapter belongs to a different base model")
        out, n_in = base_shapes[wkey]
        b = af.meta.get("bone_b")
        if af.meta["method"] == "bone" and (n_in % b or out % b):
            raise UserError(f"adapter {af.path} uses Bone block size {b}, which does not divide {wkey} "
                            f"of shape ({out}, {n_in}) in {what}; the adapter belongs to a different base model")
        want = expected_layer_shapes(af.meta, out, n_in)
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
    w = weight.float()
    f = {k: v.float() for k, v in tensors.items()}
    if meta["method"] == "bone":
        mode = meta.get("bone_mode", "row")
        if mode == "simple":                      # delta[o, c*b + i] = bone[i, o]
            out, n_in = w.shape
            b = f["bone"].shape[0]
            w2 = (w.view(out, n_in // b, b) + f["bone"].t().unsqueeze(1)).view(out, n_in)
        elif mode == "ab":
            w2 = w + bone_delta(w, f["bone_a"], "ab", f["bone_b"])
        else:
            w2 = w + bone_delta(w, f["bone"], mode)
    elif meta["method"] == "lora":
        w2 = w + lora_delta(f["lora_A"], f["lora_B"], meta["lora_alpha"] / meta["lora_r"])
    else:                                          # PiSSA / OLoRA: W_res + B A
        w2 = w - f["init_lora_B"] @ f["init_lora_A"] + f["lora_B"] @ f["lora_A"]
    return w2.to(weight.dtype)


def merge_state_dict(base: dict[str, Tensor], af: AdapterFile) -> dict[str, Tensor]:
    """A new state dict: base with every adapter folded in and trained tensors replaced."""
    check_against_base(af, {k: tuple(v.shape) for k, v in base.items()}, "the base checkpoint")
    out = dict(base)
    for name, tensors in af.layers.items():
        out[f"{name}.weight"] = merged_weight(base[f"{name}.weight"], af.meta, tensors)
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
    if meta.get("bone_mode") == "simple":
        raise UserError(f"adapter {af.path} is a simplified Bone (2-D .bone) adapter, which rwkv-bone "
                        "does not train; fold it in with merge.py and load the merged checkpoint")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, layer in adapter_modules(model).items():      # wrapped layers: same weight key
        shapes[f"{name}.weight"] = tuple(layer.weight.shape)
    check_against_base(af, shapes, "the model")
    # Check every key both ways before the model is touched (PiSSA rewrites base weights).
    wrapped = adapter_modules(model)
    layer_names = list(wrapped) or [f"blocks.{i}.{t}" for i in range(len(model.blocks))
                                    for t in meta["targets"]]
    kinds = [k for k in expected_layer_shapes(meta, 1, 1) if not k.startswith("init_")]
    expected = {f"{n}.{k}" for n in layer_names for k in kinds}
    for part in meta.get("train_parts", []):
        expected |= set(trainable_part_params(model, part))
    if wrapped:
        expected |= {n for n, p in model.named_parameters() if p.requires_grad}
    given = {f"{n}.{k}" for n, t in af.layers.items() for k in t if not k.startswith("init_")}
    given |= set(af.others)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing:
        raise UserError(f"adapter {af.path} lacks {missing[0]}" +
                        (f" and {len(missing) - 1} more" if len(missing) > 1 else "") +
                        " that the model trains; it was saved with other targets or train parts")
    if unexpected:
        raise UserError(f"adapter {af.path} has {unexpected[0]}" +
                        (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") +
                        " that the model does not train; check its targets and train parts")
    if not wrapped:
        options = {k: meta[k] for k in ("bone_b", "bone_mode", "lora_r", "lora_alpha", "lora_dropout",
                                        "svd_niter") if k in meta}
        if meta["method"] != "bone":
            options["pissa_r"] = options.get("lora_r")
        factors = {n: (t["init_lora_A"], t["init_lora_B"]) for n, t in af.layers.items()
                   if "init_lora_A" in t}
        apply_peft(model, meta["method"], targets=meta["targets"], init_factors=factors, **options)
    else:
        have = getattr(model, "peft_config", {})
        for k in ("method", "bone_mode", "bone_b", "lora_r", "lora_alpha"):
            if k in meta and k in have and str(have[k]) != str(meta[k]):
                raise UserError(f"the model's adapters have {k}={have.get(k)!r} but adapter "
                                f"{af.path} has {meta[k]!r}; load it into a fresh base model")
    mark_trainable(model, meta.get("train_parts", []))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sorted(given):
            src = af.others.get(key)
            if src is None:
                name, kind = key.rsplit(".", 1)
                src = af.layers[name][kind]
            params[key].copy_(src)
    return sorted(given)


__all__ = ["AdapterFile", "adapter_state_dict", "save_adapter", "read_adapter_file", "load_adapter",
           "merge_state_dict", "merged_weight", "check_against_base"]

"""The one in-memory description of an adapter that every file format is turned into (and that
merge.py, generate.py and load_adapter consume), and the pieces the readers share."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...errors import UserError
from ..registry import layer_kinds
from ..state import STATE_KEY_RE

META_KEY = "__peft__"


def layer_key_re() -> re.Pattern:
    """blocks.{i}.{att|ffn}.{name}.{kind} for every tensor kind of the registry's methods."""
    return re.compile(r"^(blocks\.\d+\.(?:att|ffn)\.\w+)\.(" + "|".join(layer_kinds()) + r")$")


@dataclass
class AdapterFile:
    """An adapter, parsed: its settings, per-layer tensors, learned initial states and trained
    base tensors. meta["method"] names the per-layer method (registry entry), "state" for a file
    holding only states, or "none" for one holding only base tensors."""
    path: str
    meta: dict                                   # method, its settings, targets, train_parts, format
    layers: dict[str, dict[str, Tensor]] = field(default_factory=dict)   # layer -> {kind: tensor}
    others: dict[str, Tensor] = field(default_factory=dict)              # trained base tensors
    states: dict[str, Tensor] = field(default_factory=dict)              # blocks.{i}.att.time_state


def load_tensor_dict(path: str, what: str) -> dict:
    """A torch.save'd dict (prefixes stripped), or a UserError saying why it cannot be one."""
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
    from ...checkpoint import strip_prefixes
    return strip_prefixes(obj)


def split_tensors(af: AdapterFile, raw: dict[str, Tensor]) -> AdapterFile:
    """Sort `raw` ({key: tensor}) into af.layers / af.states / af.others by key."""
    bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"adapter {af.path} has a non-tensor entry {bad[0]!r}; expected a dict of tensors")
    layer_re = layer_key_re()
    for key, t in raw.items():
        m = layer_re.match(key)
        if m:
            af.layers.setdefault(m.group(1), {})[m.group(2)] = t
        elif STATE_KEY_RE.match(key):
            af.states[key] = t
        else:
            af.others[key] = t
    if not af.layers and not af.others and not af.states:
        raise UserError(f"adapter {af.path} holds no tensors; was it saved before training started?")
    return af


def parts_of(others: dict[str, Tensor]) -> list[str]:
    """The --train_parts groups the trained base tensors of a file belong to."""
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


def targets_of(af: AdapterFile) -> list[str]:
    return sorted({name.split(".", 2)[2] for name in af.layers})

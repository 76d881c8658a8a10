"""The one table of fine-tuning methods: every place that depends on the method (injection,
counting, saving, loading, merging, labels) looks its entry up here instead of branching on names.

An entry says, for one method:
    settings(options) -> dict        the method's own settings (defaults filled in), recorded in
                                     model.peft_config and in adapter files
    layer / build(base, s, name, f)  the wrapper class put around each target nn.Linear (None for a
                                     method that adds model-level tensors instead, e.g. state)
    check_layer(name, out, in, s)    refuse (UserError) before the model is touched
    layer_shapes(s, out, in)         {tensor kind: shape} one adapted (out, in) linear holds in a file;
                                     kinds starting with "init_" are saved but never trained
    merged(W, s, tensors)            W' in float32 from float32 W and the layer's tensors
    apply_model(model, s)            model-level tensors the method adds (state tuning), their names
    label(s)                         short text for logs ("bone-row b=64")
    options                          the option names (= train.py flags) settings() reads
    supports_quant                   whether it runs on a quantised base (train.py --quant)
    peft_folder(s)                   whether an HF PEFT folder can hold it (train.py --adapter_format peft)
The math of each method opens its own file: bone.py, lora.py (+ PiSSA/OLoRA), miss.py, state.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from ..errors import UserError
from .. import peft_names
from . import bone, lora, miss, state


@dataclass(frozen=True)
class Method:
    name: str
    settings: Callable[[dict], dict]
    layer: Optional[type]
    build: Optional[Callable[..., nn.Module]]
    check_layer: Callable[[str, int, int, dict], None]
    layer_shapes: Callable[[dict, int, int], dict[str, tuple[int, ...]]]
    merged: Callable[[Tensor, dict, dict], Tensor]
    label: Callable[[dict], str]
    options: tuple[str, ...]
    supports_quant: bool
    peft_folder: Callable[[dict], bool]
    apply_model: Optional[Callable[[nn.Module, dict], list[str]]] = None

    @property
    def wraps_linears(self) -> bool:
        return self.layer is not None

    def trained_kinds(self, s: dict) -> list[str]:
        """Tensor kinds of one layer that train (the saved ones minus the init_* factors)."""
        return [k for k in self.layer_shapes(s, 1, 1) if not k.startswith("init_")]


def _always(s: dict) -> bool:
    return True


def _never(s: dict) -> bool:
    return False


def _lora_family(name: str) -> Method:
    # Only plain LoRA has an HF PEFT folder (PiSSA/OLoRA would need their init factors there too).
    return Method(name, lora.settings_for(name), lora.LoraLinear, lora.build_for(name), lora.check_layer,
                  lora.shapes_for(name), lora.merged, lora.label_for(name), lora.options_for(name),
                  supports_quant=True, peft_folder=_always if name == "lora" else _never)


REGISTRY: dict[str, Method] = {
    "bone": Method("bone", bone.settings, bone.BoneLinear, bone.build, bone.check_layer,
                   bone.layer_shapes, bone.merged, bone.label, bone.OPTIONS,
                   supports_quant=True, peft_folder=bone.peft_folder),
    "lora": _lora_family("lora"),
    "pissa": _lora_family("pissa"),
    "olora": _lora_family("olora"),
    "miss": Method("miss", miss.settings, miss.MissLinear, miss.build, miss.check_layer,
                   miss.layer_shapes, miss.merged, miss.label, miss.OPTIONS,
                   supports_quant=False, peft_folder=_always),
    "state": Method("state", state.settings, None, None, state.check_layer, state.layer_shapes,
                    state.merged, state.label, state.OPTIONS,
                    supports_quant=False, peft_folder=_never, apply_model=state.apply_model),
}
METHODS = tuple(REGISTRY)
if METHODS != peft_names.METHODS:
    raise RuntimeError(f"rwkv_bone/peft_names.py lists {peft_names.METHODS}, the registry {METHODS}")
# Every option any method reads (apply_peft refuses others, so a typo cannot pass silently).
OPTIONS = tuple(dict.fromkeys(o for m in REGISTRY.values() for o in m.options))
LAYER_TYPES = tuple(m.layer for m in REGISTRY.values() if m.layer is not None)
# Every tensor kind a layer can hold in a file, for parsing keys.
LAYER_KINDS = ("bone", "bone_a", "bone_b", "lora_A", "lora_B", "init_lora_A", "init_lora_B", "miss")


def get_method(name: str) -> Method:
    """The registry entry of `name`, or a UserError listing the choices."""
    if name not in REGISTRY:
        raise UserError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


def method_settings(name: str, options: dict) -> dict:
    """The recorded settings of method `name` from any mix of options (others are ignored)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown adapter option {unknown[0]!r}; known options: {', '.join(OPTIONS)}")
    return get_method(name).settings({k: v for k, v in options.items() if v is not None})


__all__ = ["Method", "REGISTRY", "METHODS", "OPTIONS", "LAYER_TYPES", "LAYER_KINDS", "get_method",
           "method_settings"]

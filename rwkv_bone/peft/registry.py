"""The one table of fine-tuning methods: every place that depends on the method (train.py's flags
and checks, --resume, injection, counting, saving, loading, merging, labels) reads its entry here
instead of branching on names. The table imports without torch (train.py --help reads it); the
code of a method is imported the first time something needs it.

An entry says, for one method:
    options                          its options dataclass (rwkv_bone/peft/options/): the fields are
                                     train.py's flags and apply_peft's keywords, with defaults, help
                                     and checks; it also gives the recorded settings and the label
    code_path                        "module:attribute" of its `MethodCode` (below), beside its math
    supports_quant                   whether it runs on a quantised base (train.py --quant)
and its options class says whether an HF PEFT folder can hold it (peft_folder, train.py
--adapter_format peft). A method's `MethodCode` says:
    layer / build(base, s, name, f)  the wrapper class put around each target nn.Linear (None for a
                                     method that adds model-level tensors instead, e.g. state)
    check_layer(name, out, in, s)    refuse (UserError) before the model is touched
    layer_shapes(s, out, in)         {tensor kind: shape} one adapted (out, in) linear holds in a file;
                                     kinds starting with "init_" are saved but never trained
    kinds                            every tensor kind layer_shapes can name (file keys are parsed by them)
    merged(W, s, tensors)            W' in float32 from float32 W and the layer's tensors
    apply_model(model, s)            model-level tensors the method adds (state tuning), their names
A new method is its math file (with its MethodCode), its options file and one `register` line here.
The math of each method opens its own file: bone.py, lora.py (+ PiSSA/OLoRA), miss.py, state.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ..errors import UserError
from .options import MethodOptions
from .options.bone import BoneOptions
from .options.lora import LoraOptions, OloraOptions, PissaOptions
from .options.miss import MissOptions
from .options.state import StateOptions


@dataclass(frozen=True)
class MethodCode:
    """What a method does to tensors (defined beside its math; see the module docstring)."""
    layer: Optional[type]
    build: Optional[Callable[..., Any]]
    check_layer: Callable[[str, int, int, dict], None]
    layer_shapes: Callable[[dict, int, int], dict[str, tuple[int, ...]]]
    kinds: tuple[str, ...]
    merged: Callable[[Any, dict, dict], Any]
    apply_model: Optional[Callable[[Any, dict], list[str]]] = None


@dataclass(frozen=True)
class Method:
    name: str
    options: type[MethodOptions]
    code_path: str
    supports_quant: bool

    @property
    def code(self) -> MethodCode:
        module, attr = self.code_path.split(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.options.fields())

    def settings(self, options: Mapping[str, Any]) -> dict:
        """The recorded settings from the method's options among `options`, checked."""
        opts = self.options.from_options(options)
        opts.check()
        return opts.settings()

    def label(self, settings: Mapping[str, Any]) -> str:
        return self.options.label(settings)

    def peft_folder(self, settings: Mapping[str, Any]) -> bool:
        return self.options.peft_folder(settings)

    def options_of(self, settings: Mapping[str, Any]) -> dict:
        """apply_peft keywords that rebuild recorded `settings`."""
        return self.options.options_of(settings)

    def compared_settings(self, settings: Mapping[str, Any]) -> list[str]:
        """The recorded settings an adapter loaded into an adapted model must agree on (all but
        the training_only ones)."""
        loose = {f.name for f in self.options.fields() if f.metadata["training_only"]}
        return [k for k in settings if k not in loose]

    # what the method's code does (imports it)
    @property
    def layer(self) -> Optional[type]:
        return self.code.layer

    @property
    def wraps_linears(self) -> bool:
        return self.code.layer is not None

    def build(self, base, s: dict, name: str, init_factors=None):
        return self.code.build(base, s, name, init_factors)

    def check_layer(self, name: str, out: int, n_in: int, s: dict) -> None:
        self.code.check_layer(name, out, n_in, s)

    def layer_shapes(self, s: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        return self.code.layer_shapes(s, out, n_in)

    def merged(self, w, s: dict, tensors: dict):
        return self.code.merged(w, s, tensors)

    @property
    def apply_model(self) -> Optional[Callable[[Any, dict], list[str]]]:
        return self.code.apply_model

    def trained_kinds(self, s: dict) -> list[str]:
        """Tensor kinds of one layer that train (the saved ones minus the init_* factors)."""
        return [k for k in self.layer_shapes(s, 1, 1) if not k.startswith("init_")]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the table (a name may be registered once)."""
    if method.name in REGISTRY or method.name == "none":
        raise ValueError(f"fine-tuning method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


register(Method("bone", BoneOptions, "rwkv_bone.peft.bone:CODE", supports_quant=True))
register(Method("lora", LoraOptions, "rwkv_bone.peft.lora:LORA", supports_quant=True))
register(Method("pissa", PissaOptions, "rwkv_bone.peft.lora:PISSA", supports_quant=True))
register(Method("olora", OloraOptions, "rwkv_bone.peft.lora:OLORA", supports_quant=True))
register(Method("miss", MissOptions, "rwkv_bone.peft.miss:CODE", supports_quant=False))
register(Method("state", StateOptions, "rwkv_bone.peft.state:CODE", supports_quant=False))


def methods() -> tuple[str, ...]:
    return tuple(REGISTRY)


def option_fields() -> dict[str, tuple[Any, type]]:
    """{option name: (its dataclass field, its value type)} over every method, in table order; an
    option several methods share (lora_r) must be declared alike by each."""
    out: dict[str, tuple[Any, type]] = {}
    for m in REGISTRY.values():
        types = m.options.value_types()
        for f in m.options.fields():
            if f.name in out:
                seen, seen_type = out[f.name]
                if (seen.default, dict(seen.metadata), seen_type) != (f.default, dict(f.metadata), types[f.name]):
                    raise RuntimeError(f"option {f.name} of method {m.name} differs from an earlier method's")
                continue
            out[f.name] = (f, types[f.name])
    return out


def option_names() -> tuple[str, ...]:
    """Every option any method reads (apply_peft refuses others, so a typo cannot pass silently)."""
    return tuple(option_fields())


def option_classes() -> list[type[MethodOptions]]:
    """Each options class once (in table order), for checks that run whatever the method."""
    return list(dict.fromkeys(m.options for m in REGISTRY.values()))


def layer_types() -> tuple[type, ...]:
    return tuple(dict.fromkeys(m.layer for m in REGISTRY.values() if m.layer is not None))


def layer_kinds() -> tuple[str, ...]:
    """Every tensor kind a layer can hold in a file, for parsing keys."""
    return tuple(dict.fromkeys(k for m in REGISTRY.values() for k in m.code.kinds))


def get_method(name: str) -> Method:
    """The registry entry of `name`, or a UserError listing the choices."""
    if name not in REGISTRY:
        raise UserError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_settings(name: str, options: Mapping[str, Any]) -> dict:
    """The recorded settings of method `name` from any mix of options (others are ignored)."""
    known = option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"unknown adapter option {unknown[0]!r}; known options: {', '.join(known)}")
    return get_method(name).settings(options)


def __getattr__(name: str):
    # The table can grow (register), so its derived lists are computed when read.
    if name == "METHODS":
        return methods()
    if name == "OPTIONS":
        return option_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "MethodCode", "REGISTRY", "register", "methods", "option_fields", "option_names",
           "option_classes", "layer_types", "layer_kinds", "get_method", "method_settings"]

"""Each fine-tuning method's options as a small frozen dataclass, importable without torch.

A field is one option: its name is the train.py flag (--bone_b) and the apply_peft keyword
(bone_b=64), and `option()` gives its default, help, choices and checks. From these fields come
train.py's adapter flags and their checks, the settings recorded in model.peft_config and in
adapter files, the --resume comparison and the labels (rwkv_bone/peft/registry.py holds the
table; rwkv_bone/train/args.py and checkpoints.py read it). A check is `check(flag, value)` that
raises one UserError sentence; None values (an option left to its default) are not checked.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping, Optional, Sequence

from ...errors import UserError

Check = Callable[[str, Any], None]


def option(default: Any, help: str, *, choices: Optional[Sequence[str]] = None,
           checks: Sequence[Check] = (), training_only: bool = False) -> Any:
    """A dataclass field that is one method option. training_only: the option acts only while
    training (dropout) or at initialisation (SVD iterations), so an adapter loaded into an adapted
    model need not agree with it."""
    meta = dict(help=help, choices=None if choices is None else tuple(choices), checks=tuple(checks),
                training_only=training_only)
    return dataclasses.field(default=default, metadata=meta)


def positive(flag: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{flag} must be a positive integer, got {value}")


def finite(flag: str, value: Any) -> None:
    if value is not None and not math.isfinite(value):
        raise UserError(f"--{flag} {value} is not a finite number; give a plain number")


def fraction(flag: str, value: Any) -> None:
    if value is not None and not 0 <= value < 1:
        raise UserError(f"--{flag} must lie in [0, 1)")


def _value_type(hint: Any) -> type:
    """int for `int` and `int | None`, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """The base of every method's options; a subclass declares its fields with `option()` and may
    override check (rules between fields), settings (what is recorded), options_of (its inverse),
    label and peft_folder."""

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def value_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: _value_type(hints[f.name]) for f in cls.fields()}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "MethodOptions":
        """The options of this method among `options` (others are ignored; None = the default),
        converted to the field types (check() is not run; options are int, float or str)."""
        kinds = cls.value_types()
        given = {k: kinds[k](v) for k, v in options.items() if k in kinds and v is not None}
        return cls(**given)

    def check(self) -> None:
        """Refuse values that can never work (one UserError sentence naming the flag)."""
        for f in self.fields():
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if choices is not None and value is not None and value not in choices:
                raise UserError(f"unknown --{f.name} {value!r}; choose one of {', '.join(choices)}")
            for check in f.metadata["checks"]:
                check(f.name, value)

    def settings(self) -> dict[str, Any]:
        """What model.peft_config and adapter files record (and the layers are built from)."""
        return dataclasses.asdict(self)

    @classmethod
    def options_of(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """apply_peft keywords that rebuild recorded `settings` (a loaded adapter's meta)."""
        return {f.name: settings[f.name] for f in cls.fields() if f.name in settings}

    @classmethod
    def label(cls, settings: Mapping[str, Any]) -> str:
        """A short name for logs and plots; by default every option as flag=value."""
        return " ".join(f"{f.name}={settings[f.name]}" for f in cls.fields() if f.name in settings)

    @classmethod
    def peft_folder(cls, settings: Mapping[str, Any]) -> bool:
        """Whether an HF PEFT folder can hold the adapter (train.py --adapter_format peft)."""
        return False


__all__ = ["MethodOptions", "option", "positive", "finite", "fraction", "Check"]

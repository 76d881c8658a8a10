"""State tuning's options: none (the math: rwkv_bone/peft/state.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import MethodOptions


@dataclass(frozen=True)
class StateOptions(MethodOptions):
    @classmethod
    def label(cls, settings: Mapping[str, Any]) -> str:
        return "state"

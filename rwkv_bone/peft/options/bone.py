"""Bone's options (the math: rwkv_bone/peft/bone.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import MethodOptions, option, positive

BONE_MODES = ("row", "col", "ab")


@dataclass(frozen=True)
class BoneOptions(MethodOptions):
    bone_b: int = option(64, "Bone block size b", checks=(positive,))
    bone_mode: str = option("row", "Bone variant", choices=BONE_MODES)

    @classmethod
    def label(cls, settings: Mapping[str, Any]) -> str:
        return f"bone-{settings['bone_mode']} b={settings['bone_b']}"

    @classmethod
    def peft_folder(cls, settings: Mapping[str, Any]) -> bool:
        """An HF PEFT folder holds the col variant only (as MiSS "bat")."""
        return settings["bone_mode"] == "col"

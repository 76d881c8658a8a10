"""The options of LoRA, PiSSA and OLoRA (the math: rwkv_bone/peft/lora.py). The three share their
flags and their recorded settings (lora_r is the rank, lora_alpha / lora_r the scale); they differ
in what they read: lora_alpha counts for LoRA only (PiSSA/OLoRA use scale 1), pissa_r (default
lora_r) for PiSSA and OLoRA, svd_niter for PiSSA."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import MethodOptions, finite, fraction, option, positive


@dataclass(frozen=True)
class LoraOptions(MethodOptions):
    lora_r: int = option(32, "LoRA / OLoRA rank", checks=(positive,))
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, scale 1)", checks=(finite,))
    lora_dropout: float = option(0.0, "LoRA dropout", checks=(finite, fraction), training_only=True)
    pissa_r: int | None = option(None, "PiSSA / OLoRA rank (default --lora_r)", checks=(positive,))
    svd_niter: int = option(4, "PiSSA fast-SVD iterations", checks=(positive,), training_only=True)

    METHOD = "lora"

    def rank(self) -> int:
        return self.lora_r

    def settings(self) -> dict[str, Any]:
        rank = self.rank()
        alpha = self.lora_alpha if self.METHOD == "lora" and self.lora_alpha is not None else rank
        return dict(lora_r=rank, lora_alpha=float(alpha), lora_dropout=self.lora_dropout,
                    svd_niter=self.svd_niter)

    @classmethod
    def label(cls, settings: Mapping[str, Any]) -> str:
        return f"{cls.METHOD} r={settings['lora_r']}"

    @classmethod
    def peft_folder(cls, settings: Mapping[str, Any]) -> bool:
        # Only plain LoRA has an HF PEFT folder (PiSSA/OLoRA would need their init factors there too).
        return cls.METHOD == "lora"


@dataclass(frozen=True)
class PissaOptions(LoraOptions):
    METHOD = "pissa"

    def rank(self) -> int:
        return self.lora_r if self.pissa_r is None else self.pissa_r

    @classmethod
    def options_of(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        return dict(super().options_of(settings), pissa_r=settings.get("lora_r"))


@dataclass(frozen=True)
class OloraOptions(PissaOptions):
    METHOD = "olora"

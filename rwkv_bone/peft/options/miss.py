"""MiSS's options (the math: rwkv_bone/peft/miss.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import UserError
from . import MethodOptions, option, positive

MISS_MODES = ("default", "mini")


@dataclass(frozen=True)
class MissOptions(MethodOptions):
    miss_r: int = option(64, "MiSS rank r (r-wide input slices summed)", checks=(positive,))
    miss_mode: str = option("default", "MiSS variant: default (r, out) tensor per linear, mini (r, miss_mini_r) "
                                       "tiled over the output", choices=MISS_MODES)
    miss_mini_r: int | None = option(None, "--miss_mode mini: output width of the tensor")

    def check(self) -> None:
        super().check()
        if self.miss_mode == "mini" and (self.miss_mini_r is None or self.miss_mini_r <= 0):
            raise UserError("--miss_mode mini needs a positive --miss_mini_r (the tensor's output width, e.g. 64)")
        if self.miss_mini_r is not None and self.miss_mode != "mini":
            raise UserError("--miss_mini_r applies to --miss_mode mini only; drop it or add --miss_mode mini")

    @classmethod
    def label(cls, settings: Mapping[str, Any]) -> str:
        mini = f" mini_r={settings['miss_mini_r']}" if settings["miss_mode"] == "mini" else ""
        return f"miss r={settings['miss_r']}{mini}"

    @classmethod
    def peft_folder(cls, settings: Mapping[str, Any]) -> bool:
        return True

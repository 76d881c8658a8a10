"""RWKV-6 ("x060") model dimensions as one explicit dataclass.

Every dimension of an existing checkpoint is read from its tensor shapes (`from_state_dict`), never
derived from n_embd: released 7B/14B models use ranks Dm = 64, Dd = 128 while 1.6B/3B use 32/64.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from .errors import UserError


def default_dim_ffn(n_embd: int) -> int:
    """The reference trainer's FFN width: 3.5 * C rounded down to a multiple of 32."""
    return int(n_embd * 3.5) // 32 * 32


@dataclass
class RWKV6Config:
    n_layer: int  # L
    n_embd: int  # C
    vocab_size: int  # V
    dim_att: int | None = None  # A (= C in every released model)
    dim_ffn: int | None = None  # F
    head_size: int = 64  # N
    dim_maa: int = 32  # Dm, rank of the token-shift mixing projection
    dim_decay: int = 64  # Dd, rank of the decay projection
    wkv_backend: str = "auto"  # the WKV op's backend (rwkv_bone.wkv.BACKENDS): a run choice, not a dimension

    def __post_init__(self) -> None:
        if self.dim_att is None:
            self.dim_att = self.n_embd
        if self.dim_ffn is None:
            self.dim_ffn = default_dim_ffn(self.n_embd)
        for name in ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn", "head_size", "dim_maa", "dim_decay"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model setting {name} must be a positive integer, got {value!r}")
        from .wkv import BACKENDS

        if self.wkv_backend not in BACKENDS:
            raise UserError(f"wkv_backend must be one of {', '.join(BACKENDS)}, got {self.wkv_backend!r}")
        if self.dim_att % self.head_size:
            raise UserError(
                f"dim_att {self.dim_att} is not a multiple of head_size {self.head_size}; "
                "choose an attention width divisible by the head size"
            )

    @property
    def n_head(self) -> int:  # H
        return self.dim_att // self.head_size

    def replace(self, **changes) -> "RWKV6Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "RWKV6Config":
        """The released World-model settings ("1.6b", "3b", "7b", "14b"), optionally overridden."""
        key = name.lower().replace("_", "").replace("-", "")
        if key not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> "RWKV6Config":
        """Infer every dimension from the shapes of an (already prefix-stripped) official state dict."""
        needed = {
            "emb.weight": "V and C",
            "blocks.0.att.key.weight": "A",
            "blocks.0.ffn.key.weight": "F",
            "blocks.0.att.time_faaaa": "H and N",
            "blocks.0.att.time_maa_w2": "Dm",
            "blocks.0.att.time_decay_w1": "Dd",
        }
        for key, what in needed.items():
            if key not in sd:
                raise UserError(f"the checkpoint has no tensor {key} (needed to read {what}); is it a complete RWKV-6 model?")
        layers = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
        vocab_size, n_embd = sd["emb.weight"].shape
        n_head, head_size = sd["blocks.0.att.time_faaaa"].shape
        return cls(
            n_layer=1 + max(layers),
            n_embd=int(n_embd),
            vocab_size=int(vocab_size),
            dim_att=int(sd["blocks.0.att.key.weight"].shape[0]),
            dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
            head_size=int(head_size),
            dim_maa=int(sd["blocks.0.att.time_maa_w2"].shape[1]),
            dim_decay=int(sd["blocks.0.att.time_decay_w1"].shape[1]),
        )

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The optional learned initial WKV states (state tuning): blocks.{i}.att.time_state."""
        return {f"blocks.{i}.att.time_state": (self.n_head, self.head_size, self.head_size)
                for i in range(self.n_layer)}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the official checkpoint layout with its shape, in the reference order."""
        C, A, F, V = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size
        H, N, Dm, Dd = self.n_head, self.head_size, self.dim_maa, self.dim_decay
        shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            names = ["ln1", "ln2"] + (["ln0"] if i == 0 else [])
            for ln in names:
                shapes[b + ln + ".weight"] = (C,)
                shapes[b + ln + ".bias"] = (C,)
            for g in ("x", "w", "k", "v", "r", "g"):
                shapes[b + f"att.time_maa_{g}"] = (1, 1, C)
            shapes[b + "att.time_maa_w1"] = (C, 5 * Dm)
            shapes[b + "att.time_maa_w2"] = (5, Dm, C)
            shapes[b + "att.time_decay"] = (1, 1, A)
            shapes[b + "att.time_decay_w1"] = (C, Dd)
            shapes[b + "att.time_decay_w2"] = (Dd, A)
            shapes[b + "att.time_faaaa"] = (H, N)
            for lin in ("receptance", "key", "value"):
                shapes[b + f"att.{lin}.weight"] = (A, C)
            shapes[b + "att.output.weight"] = (C, A)
            shapes[b + "att.gate.weight"] = (A, C)
            shapes[b + "att.ln_x.weight"] = (A,)
            shapes[b + "att.ln_x.bias"] = (A,)
            shapes[b + "ffn.time_maa_k"] = (1, 1, C)
            shapes[b + "ffn.time_maa_r"] = (1, 1, C)
            shapes[b + "ffn.key.weight"] = (F, C)
            shapes[b + "ffn.receptance.weight"] = (C, C)
            shapes[b + "ffn.value.weight"] = (C, F)
        shapes["ln_out.weight"] = (C,)
        shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (V, C)
        return shapes

    def n_params(self) -> int:
        """Total parameter count of the official layout (no model needs to exist)."""
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


# Released RWKV-6 World models: N = 64, V = 65536, F = 3.5 * C.
PRESETS: dict[str, RWKV6Config] = {
    "1.6b": RWKV6Config(n_layer=24, n_embd=2048, vocab_size=65536, dim_ffn=7168, dim_maa=32, dim_decay=64),
    "3b": RWKV6Config(n_layer=32, n_embd=2560, vocab_size=65536, dim_ffn=8960, dim_maa=32, dim_decay=64),
    "7b": RWKV6Config(n_layer=32, n_embd=4096, vocab_size=65536, dim_ffn=14336, dim_maa=64, dim_decay=128),
    "14b": RWKV6Config(n_layer=61, n_embd=4096, vocab_size=65536, dim_ffn=14336, dim_maa=64, dim_decay=128),
}

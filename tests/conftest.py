"""Shared fixtures: a tiny RWKV-6 config and a factory writing random official-layout checkpoints.

The random weights are "realistic": decays in a sane range, unit-ish activations, non-zero output
projections, so logits vary and comparisons against the `rwkv` package are meaningful.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

from rwkv_bone.config import RWKV6Config
from rwkv_bone.model import RWKV6

# Non-default ranks and FFN width so nothing can silently assume Dm = 32, Dd = 64, F = 3.5*C.
TINY = dict(n_layer=2, n_embd=128, vocab_size=300, dim_ffn=320, head_size=64, dim_maa=16, dim_decay=24)


@torch.no_grad()
def randomize_(model: RWKV6, seed: int = 0) -> RWKV6:
    """Fill every parameter with random but plausible values (in place, returns the model)."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    def randn(shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    for name, p in model.named_parameters():
        shape = p.shape
        leaf = name.rsplit(".", 1)[-1]
        if name == "emb.weight":
            v = randn(shape, 1.0)
        elif leaf in ("weight", "bias") and (".ln" in name or name.startswith("ln_out")):
            v = 1.0 + randn(shape, 0.1) if leaf == "weight" else randn(shape, 0.1)
        elif leaf.startswith("time_maa_w"):  # time_maa_w1/w2 (not time_maa_w, handled below)
            v = randn(shape, 0.1) if leaf in ("time_maa_w1", "time_maa_w2") else rand(shape, 0.0, 1.0)
        elif leaf.startswith("time_maa_"):
            v = rand(shape, 0.0, 1.0)
        elif leaf == "time_decay":
            v = rand(shape, -5.0, 0.0)  # per-channel decay exp(-exp(w)) in (0.37, 0.993)
        elif leaf in ("time_decay_w1", "time_decay_w2"):
            v = randn(shape, 0.1)
        elif leaf == "time_faaaa":
            v = rand(shape, -0.5, 1.0)
        elif leaf == "weight" and p.dim() == 2:  # Linear (out, in)
            v = randn(shape, 1.0 / shape[1] ** 0.5)
        else:
            raise AssertionError(f"randomize_ does not know parameter {name}")
        p.copy_(v.to(p.dtype))
    return model


def random_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> RWKV6:
    config = RWKV6Config(**{**TINY, **overrides})
    model = RWKV6.from_config(config, device="meta").to_empty(device="cpu")  # randomize_ fills it all
    return randomize_(model, seed).to(dtype)


@pytest.fixture
def tiny_config() -> RWKV6Config:
    """2 layers, C = 128 (H = 2), V = 300, F = 320, Dm = 16, Dd = 24."""
    return RWKV6Config(**TINY)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: tiny_checkpoint(name="tiny.pth", seed=0, dtype=torch.float32, **config_overrides)
    writes a random official-layout RWKV-6 checkpoint under tmp_path and returns its path."""

    def make(name: str = "tiny.pth", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        path = tmp_path / name
        os.makedirs(path.parent, exist_ok=True)
        random_model(seed, **overrides).save_checkpoint(path, dtype=dtype)
        return path

    return make

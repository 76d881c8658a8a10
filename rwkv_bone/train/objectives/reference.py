"""The free reference model of DPO / GRPO: the same network with every trained tensor at the value
it had before training.

With adapters the trained tensors are small (the adapter, plus --train_parts), so a snapshot of them
costs next to nothing, and swapping it in gives exactly the model training started from: for the
zero-initialised methods (Bone, LoRA, MiSS, state tuning) that is the base model itself, bit for bit
(their delta terms add exact zeros); for PiSSA / OLoRA it is W_res + the initial factors, the model
those methods start from. No second model exists. Full fine-tuning (--peft none) would need a
whole copy, so there the reference log-probs are computed once before training instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class InitialWeights:
    """Snapshot of `model`'s trainable tensors, taken when built (before any update or resume)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved.values())

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block, `model` computes with the snapshot (no gradients flow to it)."""
        params = dict(model.named_parameters())
        current = {}
        try:
            with torch.no_grad():
                for n, t in self.saved.items():
                    p = params[n]
                    current[n] = p.data
                    p.data = t.to(device=p.device, dtype=p.dtype)
            yield
        finally:
            with torch.no_grad():
                for n, d in current.items():
                    params[n].data = d


__all__ = ["InitialWeights"]

"""The free reference model of DPO / GRPO: the same network with every trained tensor at the value
it had before training.

With adapters the trained tensors are small (the adapter, plus --train_parts), so a snapshot of them
costs next to nothing, and swapping it in gives exactly the model training started from: for the
zero-initialised methods (Bone, LoRA, MiSS, state tuning) that is the base model itself, bit for bit
(their delta terms add exact zeros); for PiSSA / OLoRA it is W_res + the initial factors, the model
those methods start from. No second model exists. Full fine-tuning (--peft none) would need a
whole copy, so there the reference log-probs are computed once before training instead.

Under ZeRO-3 every rank holds only a slice of each parameter, so the swap goes through DeepSpeed's
GatheredParameters: the named tensors are gathered whole, overwritten with the snapshot (which was
taken whole, before DeepSpeed sliced them) and re-sliced; afterwards the saved values go back the
same way, bit for bit.
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
        if any(hasattr(params[n], "ds_id") for n in self.saved):
            with _zero3_swapped_in(params, self.saved):
                yield
            return
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


def _zero3_write(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under ZeRO-3 each rank holds a slice of every parameter: gather the named ones whole (every
    rank, collectively), copy `values` in and let DeepSpeed re-slice them from rank 0 (its public
    GatheredParameters API); returns the whole values they held before."""
    import deepspeed

    group = [params[n] for n in values]
    with deepspeed.zero.GatheredParameters(group, modifier_rank=0), torch.no_grad():
        before = {n: params[n].data.detach().clone() for n in values}
        for n, t in values.items():
            params[n].data.copy_(t.to(device=params[n].data.device, dtype=params[n].data.dtype))
    return before


@contextmanager
def _zero3_swapped_in(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> Iterator[None]:
    current = _zero3_write(params, saved)   # the snapshot was taken whole, before DeepSpeed sliced
    try:
        yield
    finally:
        _zero3_write(params, current)        # bit for bit what the slices held


__all__ = ["InitialWeights"]

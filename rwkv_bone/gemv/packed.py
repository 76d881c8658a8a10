"""Frozen float32 linears packed for decoding: W (N, K) held as panels of PANEL = 48 rows.

Math: y = x W^T, y[b, o] = sum_k W[o, k] x[b, k]. Panel p holds rows 48p .. 48p+h-1 of W (h = 48,
or the N - 48p rows left, a multiple of 16) as one (K, h) row-major block; the panels lie one after
another in one flat float32 tensor of N * K values. So one k step of the product reads h
neighbouring outputs' weights in one run and multiplies them by one scalar of each row of x.

Why: at batch 8 the row-major kernel (gemv.c) loads 8 vectors of x for every 3 of W and reads W at
~27 GB/s; packed, an x cache line serves 16 k steps and the same 2 cores read W at ~41 GB/s
(bench/bench_gemv.py, bench/results/bench_gemv.txt), while batch 1 stays at ~46 GB/s. Decoding
(generate.py, eval.py through rwkv_bone.loading.load_model) packs its fp32 model once at load, each
weight in its own storage (no copy, ~1 s at 1.6B). Training never packs.

PackedLinear.forward takes any number of rows through the packed kernel: the decode step, and
prompts too (groups of 8 rows per panel, the panel reused from L2: 1024 rows at C2048 run 2.3x
torch's sgemm on these 2 cores, near their FMA ceiling). Where the kernel does not run, or autograd
needs a graph, torch's batched matmul over the panels gives the same product. Its state dict holds the plain
(N, K) `weight`, so saving or comparing a packed model sees an ordinary nn.Linear.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import PANEL, available, pack, pack_, try_packed_linear, unpack


def packable(lin: nn.Module) -> bool:
    """A plain bias-free float32 CPU nn.Linear whose output size is a multiple of 16."""
    return (type(lin) is nn.Linear and lin.bias is None and lin.weight is not None
            and lin.weight.dtype == torch.float32 and lin.weight.device.type == "cpu"
            and lin.out_features % 16 == 0 and lin.in_features >= 1)


class PackedLinear(nn.Module):
    """A frozen bias-free float32 linear with its weight packed in panels (see the module doc)."""

    def __init__(self, packed: Tensor, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, in_place: bool = False) -> "PackedLinear":
        """The packed copy of lin; in_place=True packs lin's own weight storage instead (no copy:
        lin must not run again)."""
        w = lin.weight.detach()
        return cls(pack_(w.contiguous()) if in_place else pack(w), lin.in_features, lin.out_features)

    @property
    def weight(self) -> Tensor:
        """The plain (N, K) weight, unpacked (a copy: for reading, not for the hot path)."""
        return unpack(self.packed, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        y = try_packed_linear(x2, self.packed, N)
        if y is None:
            y = self._torch(x2.to(torch.float32))
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def _torch(self, x: Tensor) -> Tensor:
        """x (M, K) through torch: one batched matmul over the full panels, one for the rest."""
        K, N = self.in_features, self.out_features
        full = N // PANEL * PANEL
        parts = []
        if full:
            panels = self.packed[:full * K].view(full // PANEL, K, PANEL)
            parts.append(torch.matmul(x.unsqueeze(0), panels).transpose(0, 1).reshape(x.shape[0], full))
        if full < N:
            parts.append(x @ self.packed[full * K:].view(K, N - full))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed in panels of {PANEL}"


def pack_linears(model: nn.Module) -> int:
    """Replace every packable nn.Linear of `model` (see `packable`) by a PackedLinear, in place,
    where the kernel runs on this machine; the number replaced. For a model that only runs
    (decoding): the packed weights are buffers and take no gradient. Each weight is packed in its
    own storage (gemv.pack_: no copy, no memory added), so the linears replaced are consumed, and
    so is any other view of their weights."""
    if not available():
        return 0
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if packable(child):
                setattr(module, name, PackedLinear.from_linear(child, in_place=True))
                count += 1
    return count


__all__ = ["packable", "PackedLinear", "pack_linears"]

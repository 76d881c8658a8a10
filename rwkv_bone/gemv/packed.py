"""Frozen float32 / bfloat16 linears packed for decoding: W (N, K) held as panels of PANEL = 48 rows.

Math: y = x W^T, y[b, o] = sum_k W[o, k] x[b, k]. Panel p holds rows 48p .. 48p+h-1 of W (h = 48,
or the N - 48p rows left, a multiple of 16) as one (K, h) row-major block of 32-bit words (float32:
a word is one weight; bfloat16: the pair W[o, 2i], W[o, 2i + 1], so the block is (K / 2, h, 2)); the
panels lie one after another in one flat tensor of N * K values. So one step of the product reads h
neighbouring outputs' weights in one run and multiplies them by one word of each row of x.

Why: at batch 8 the row-major kernel (gemv.c) loads 8 vectors of x for every 3 of W and reads W at
~27 GB/s; packed, an x cache line serves 16 k steps and the same 2 cores read W at ~41 GB/s
(bench/bench_gemv.py, bench/results/bench_gemv.txt), while batch 1 stays at ~46 GB/s. Decoding
(generate.py, eval.py through rwkv_bone.loading.load_model and its `pack`) packs once at load. A weight
that is already the process's own memory (fp32 converted from a bf16 checkpoint) is packed in its
own storage (no copy, ~1 s at 1.6B). A weight that is still a view of the mapped checkpoint (bf16 run
from a bf16 file) is packed into new memory (copy=True): that costs what first touching that much
memory costs, 4.7 s at 1.6B on these VMs (~0.6 GB/s; the kernel's own transposition is 0.5 s of
it), so it is only worth it for batched decoding, which gains ~30 ms per batch-8 step at 1.6B.
Packed in place, each mapped page would become a private copy by copy-on-write, at ~0.4 GB/s.
Training never packs.

PackedLinear.forward takes any number of rows through the packed kernel: the decode step, and
prompts too (groups of 8 rows per panel, the panel reused from L2: 1024 rows at C2048 run 2.3x
torch's sgemm on these 2 cores, near their FMA ceiling). Where the kernel does not run, or autograd
needs a graph, torch's batched matmul over the panels gives the same product. Its state dict holds the plain
(N, K) `weight`, so saving or comparing a packed model sees an ordinary nn.Linear.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import PANEL, available, can_pack, pack, pack_, try_packed_linear, unpack


def packable(lin: nn.Module) -> bool:
    """A plain bias-free float32 or bfloat16 CPU nn.Linear whose output size is a multiple of 16
    (and, for bfloat16, whose input size is even: the kernel reads x in pairs)."""
    return (type(lin) is nn.Linear and lin.bias is None and lin.weight is not None
            and lin.weight.device.type == "cpu" and can_pack(lin.weight.dtype, lin.out_features, lin.in_features))


class PackedLinear(nn.Module):
    """A frozen bias-free linear with its weight packed in panels (see the module doc)."""

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
            y = self._torch(x2.to(self.packed.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def _torch(self, x: Tensor) -> Tensor:
        """x (M, K) through torch: one batched matmul over the full panels, one for the rest (each
        panel read as (K, h): a view for float32, a copy for bfloat16's pairs)."""
        K, N = self.in_features, self.out_features
        g = 4 // self.packed.element_size()  # values per 32-bit word

        def block(flat: Tensor, h: int) -> Tensor:  # flat panels (P * K * h,) -> (P, K, h)
            return flat.view(-1, K // g, h, g).transpose(2, 3).reshape(-1, K, h)

        full = N // PANEL * PANEL
        parts = []
        if full:
            panels = block(self.packed[:full * K], PANEL)
            parts.append(torch.matmul(x.unsqueeze(0), panels).transpose(0, 1).reshape(x.shape[0], full))
        if full < N:
            parts.append(x @ block(self.packed[full * K:], N - full)[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed in panels of {PANEL}"


def pack_linears(model: nn.Module, copy: bool = False) -> int:
    """Replace every packable nn.Linear of `model` (see `packable`) by a PackedLinear, in place,
    where the kernel runs on this machine; the number replaced. For a model that only runs
    (decoding): the packed weights are buffers and take no gradient. Each weight is packed in its
    own storage (gemv.pack_: no copy, no memory added), so the linears replaced are consumed, and
    so is any other view of their weights; with copy=True each is packed into new memory instead
    (gemv.pack) and the old weights are left as they were (for weights mapped from a file)."""
    if not available():
        return 0
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if packable(child):
                setattr(module, name, PackedLinear.from_linear(child, in_place=not copy))
                count += 1
    return count


__all__ = ["packable", "PackedLinear", "pack_linears"]

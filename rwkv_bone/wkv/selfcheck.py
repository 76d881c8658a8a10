"""A GPU kernel (ours, cuda.py, or fla's, fla.py) checks itself: the first time it would run in a
process (per kernel, device, dtype and head size), it solves a small random problem next to the chunked PyTorch path on the same GPU.

The problem: B = 2, T = 45 (ragged: neither a multiple of the chunk length 32 nor of any block),
H = 2, the kernel's head size, r, k, v ~ N(0, 1) in the dtype being used, decays w ~ U(-6, 1.5),
a non-zero initial state, and random cotangents for y and the final state; solved twice, once
plainly and once with document starts (row 0 marked at t = 0 and 20, row 1 at 33 only, so it
also continues its initial state), i.e. through the zero-decay trick of resets.py (or natively,
for a kernel marked `takes_doc_start`, fla's). Compared:
y, the final state and every gradient (r, k, v, w, u, initial state), each as
max |kernel - chunked| / max(1, max |chunked|), against TOLERANCE[dtype] (fast-math float32
accumulation; bf16 / fp16 rounding of y and of r, k, v gradients).

On any disagreement (or a kernel error, or a non-finite value) it warns once, loudly, with the
figures, and `kernel_trusted` answers False for the rest of the process, so `wkv6` uses the
chunked path.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from .chunked import wkv6_chunked
from .resets import wkv6_with_doc_starts

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}
NAMES = ("y", "state", "gr", "gk", "gv", "gw", "gu", "gstate")

_verdicts: dict[tuple[str, str, torch.dtype, int], bool] = {}


def _problem(device: torch.device, dtype: torch.dtype, head_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, N = 2, 45, 2, head_size
    rkv = [torch.randn(B, T, H, N, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    w = (-6.0 + 7.5 * torch.rand(B, T, H, N, generator=g)).to(device)
    u = torch.randn(H, N, generator=g).to(device)
    s0 = (0.3 * torch.randn(B, H, N, N, generator=g)).to(device)
    gy = torch.randn(B, T, H, N, generator=g).to(device=device, dtype=dtype)
    gs = torch.randn(B, H, N, N, generator=g).to(device)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, [0, 20]] = True
    doc_start[1, 33] = True
    return rkv + [w, u, s0], gy, gs, doc_start.to(device)


def _solve(op: Callable, inputs: list[Tensor], gy: Tensor, gs: Tensor, doc_start: Tensor | None) -> list[Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    if doc_start is None:
        y, s = op(*leaves)
    else:
        y, s = doc_start_op(op)(*leaves, doc_start)
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + (s.float() * gs).sum(), leaves,
                                allow_unused=True)  # an input the op ignored has gradient 0
    return [y.detach(), s.detach(), *(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))]


def doc_start_op(op: Callable) -> Callable:
    """How wkv6 runs `op` with document starts: the chunked path and a kernel marked
    `takes_doc_start` natively, another kernel by zero decay."""
    if op is wkv6_chunked or getattr(op, "takes_doc_start", False):
        return lambda r, k, v, w, u, s, ds: op(r, k, v, w, u, s, doc_start=ds)
    return lambda r, k, v, w, u, s, ds: wkv6_with_doc_starts(op, r, k, v, w, u, s, ds)


def compare(kernel: Callable, device: torch.device, dtype: torch.dtype, head_size: int) -> dict[str, float]:
    """Largest relative error of each output and gradient, over the plain and the marked problem
    (inf where a value is not finite)."""
    inputs, gy, gs, doc_start = _problem(device, dtype, head_size)
    errors = {name: 0.0 for name in NAMES}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for ds in (None, doc_start):
            got = _solve(kernel, inputs, gy, gs, ds)
            want = _solve(wkv6_chunked, inputs, gy, gs, ds)
            for name, a, b in zip(NAMES, got, want):
                a, b = a.double(), b.double()
                err = float("inf") if not torch.isfinite(a).all() else \
                    ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
                errors[name] = max(errors[name], err)
    return errors


def kernel_trusted(kernel: Callable, device: torch.device, dtype: torch.dtype, head_size: int,
                   name: str = "CUDA kernel") -> bool:
    """Whether `kernel` (called `name` in the warning) passed its self-check for (device, dtype,
    head size); checks on first call."""
    key = (name, str(device), dtype, head_size)
    if key in _verdicts:
        return _verdicts[key]
    tol = TOLERANCE.get(dtype, 2e-3)
    try:
        errors = compare(kernel, device, dtype, head_size)
        bad = {k: e for k, e in errors.items() if not e <= tol}
        detail = ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
    except Exception as exc:  # a kernel that fails to run is as untrustworthy as a wrong one
        bad, detail = {"error": 1.0}, f"{type(exc).__name__}: {exc}"
    _verdicts[key] = not bad
    if bad:
        warnings.warn(
            f"\n{'!' * 78}\nwkv6: the {name} FAILED its self-check against the chunked PyTorch path on "
            f"{device} in {dtype} (relative errors: {detail}; tolerance {tol:.0e}). Using the chunked "
            f"path for the rest of this run (slower, but correct).\n{'!' * 78}",
            RuntimeWarning, stacklevel=3,
        )
    return not bad


def verdicts() -> dict[tuple[str, str, torch.dtype, int], bool]:
    """The verdicts so far, keyed (kernel name, device, dtype, head size)."""
    return dict(_verdicts)


def forget() -> None:
    """Drop the verdicts (tests)."""
    _verdicts.clear()

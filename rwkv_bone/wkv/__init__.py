"""The WKV6 operator. `wkv6` validates its arguments and dispatches to the fastest path.

    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t^T v_t

Paths: `wkv6_reference` (per-token loop, the source of truth), `wkv6_chunked` (chunked
matmul form in PyTorch, exact for any decay; CPU and fallback), `wkv6_cuda` (the CUDA kernel, used
for CUDA tensors of head size 64 in float32 / bfloat16 / float16 when the extension builds and
passes its first-use self-check against the chunked path, selfcheck.py), `wkv6_fla`
(flash-linear-attention's Triton kernels, an optional extra: fla.py).
`backend` chooses: "auto" takes the first of cuda, fla, chunked that applies to the inputs and
passed its self-check; "cuda" / "fla" ask for that kernel (a UserError where it cannot run; the
chunked path, with a loud warning, where it fails its self-check); "chunked" the PyTorch path.
All are differentiable in every input, the initial state included.
`doc_start` (B, T) bool (packed documents) zeroes the state before each marked token: natively in
the chunked path, through a zero decay at the marked token for our kernel (resets.py), as segments
of fla's varlen mode (cu_seqlens) for fla's.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import UserError
from .chunked import wkv6_chunked
from .cuda import HEAD_SIZE, KERNEL_DTYPES, cuda_kernel_available, wkv6_cuda
from .fla import INSTALL_HINT, FLAUnavailableError, fla_available, wkv6_fla
from .reference import wkv6_reference
from .resets import wkv6_with_doc_starts
from .selfcheck import kernel_trusted

__all__ = ["wkv6", "wkv6_reference", "wkv6_chunked", "wkv6_cuda", "wkv6_fla", "wkv6_with_doc_starts",
           "BACKENDS", "WKVShapeError", "WKVTypeError", "FLAUnavailableError"]

BACKENDS = ("auto", "cuda", "fla", "chunked")
FLA_MODE = "chunk"  # the fla kernel the fla backend runs (fla.py; tests under the interpreter use "recurrent")


class WKVShapeError(UserError, ValueError):
    """An argument of wkv6 has the wrong shape or lives on the wrong device."""


class WKVTypeError(UserError, TypeError):
    """An argument of wkv6 is not a tensor or has an unusable dtype."""


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + ")"


def _check_doc_start(r: Tensor, doc_start) -> None:
    if not isinstance(doc_start, Tensor) or doc_start.dtype != torch.bool:
        raise WKVTypeError("wkv6: doc_start must be a torch.bool tensor (True at each document's first token).")
    if doc_start.shape != r.shape[:2]:
        raise WKVShapeError(f"wkv6: doc_start has shape {_shape(doc_start)}, expected (B, T) = "
                            f"({r.shape[0]}, {r.shape[1]}).")
    if doc_start.device != r.device:
        raise WKVShapeError(f"wkv6: doc_start is on {doc_start.device} but r is on {r.device}; put all "
                            "inputs on one device.")


def _check(r, k, v, w, u, state) -> None:
    named = {"r": r, "k": k, "v": v, "w": w, "u": u, "state": state}
    for name, x in named.items():
        if x is None and name == "state":
            continue
        if not isinstance(x, Tensor):
            raise WKVTypeError(f"wkv6: {name} must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise WKVTypeError(
                f"wkv6: {name} has dtype {x.dtype}, expected a floating-point dtype."
            )
    if r.dim() != 4:
        raise WKVShapeError(f"wkv6: r has shape {_shape(r)}, expected 4 dimensions (B, T, H, N).")
    B, T, H, N = r.shape
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise WKVShapeError(
                f"wkv6: {name} has shape {_shape(x)}, expected (B, T, H, N) = {_shape(r)} like r."
            )
    if u.shape != (H, N):
        raise WKVShapeError(f"wkv6: u has shape {_shape(u)}, expected (H, N) = ({H}, {N}).")
    if state is not None and state.shape != (B, H, N, N):
        raise WKVShapeError(
            f"wkv6: state has shape {_shape(state)}, expected (B, H, N, N) = ({B}, {H}, {N}, {N})."
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != r.dtype:
            raise WKVTypeError(
                f"wkv6: {name} has dtype {x.dtype} but r has {r.dtype}; r, k and v must share "
                "one dtype."
            )
    for name, x in named.items():
        if x is not None and x.device != r.device:
            raise WKVShapeError(
                f"wkv6: {name} is on {x.device} but r is on {r.device}; put all inputs on one "
                "device."
            )


def _kernel_applies(r: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> bool:
    """Inputs the CUDA kernel takes, where it builds."""
    return (
        r.is_cuda
        and r.dtype in KERNEL_DTYPES
        and r.shape[-1] == HEAD_SIZE
        and all(x is None or x.dtype != torch.float64 for x in (w, u, state))
        and cuda_kernel_available(HEAD_SIZE)
    )


def _fla_inputs(r: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> bool:
    """Inputs fla's kernels take: CUDA tensors (or any, under the Triton interpreter), no float64."""
    on_device = r.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and r.dtype in KERNEL_DTYPES and all(
        x is None or x.dtype != torch.float64 for x in (w, u, state))


def _fla_applies(r: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> bool:
    """fla takes the inputs and is installed (checked second: it imports fla)."""
    return _fla_inputs(r, w, u, state) and fla_available()


def _fla_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None,
            doc_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return wkv6_fla(r, k, v, w, u, state, doc_start, mode=FLA_MODE)


_fla_op.takes_doc_start = True  # type: ignore[attr-defined]  # packed rows natively (cu_seqlens)


def _choose(backend: str, r: Tensor, w: Tensor, u: Tensor, state: Tensor | None):
    """The kernel to run (None = the chunked path) for `backend`."""
    if backend not in BACKENDS:
        raise WKVTypeError(f"wkv6: backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "chunked":
        return None
    if backend == "cuda" and not _kernel_applies(r, w, u, state):
        raise UserError(f"wkv6: backend 'cuda' needs CUDA tensors of head size {HEAD_SIZE} in float32 / "
                        "bfloat16 / float16 and a kernel that builds; use backend 'auto' or 'chunked'.")
    if backend == "fla" and not _fla_inputs(r, w, u, state):
        raise UserError("wkv6: backend 'fla' needs CUDA tensors in float32 / bfloat16 / float16 (no "
                        "float64); use backend 'auto' or 'chunked'.")
    if backend == "fla" and not fla_available():
        raise FLAUnavailableError(f"wkv6: backend 'fla' needs flash-linear-attention; {INSTALL_HINT}.")
    key = (r.device, r.dtype, r.shape[-1])
    if backend in ("auto", "cuda") and _kernel_applies(r, w, u, state) and kernel_trusted(wkv6_cuda, *key):
        return wkv6_cuda
    # auto takes fla on CUDA tensors only (the Triton interpreter on the CPU is for tests asking for it)
    if (backend == "fla" or (backend == "auto" and r.is_cuda)) and _fla_applies(r, w, u, state) and \
            kernel_trusted(_fla_op, *key, name=f"fla {FLA_MODE} kernel"):
        return _fla_op
    return None


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None,
    doc_start: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """WKV6 over a whole sequence.

    r, k, v, w: (B, T, H, N), w the raw decay (per-step decay exp(-exp(w))); u: (H, N) bonus;
    state: (B, H, N, N) initial state (rows = key channel) or None for zeros. r, k, v share one
    floating dtype; w, u, state may be any floating dtype. Half-precision inputs are computed in
    float32. Returns y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in float32
    (float64 when any input is float64). Raises WKVShapeError / WKVTypeError (a UserError and a
    ValueError / TypeError) with one sentence naming the bad argument.
    doc_start: (B, T) bool or None; the state is zero before every marked token (a document's
    first token), as if each document ran alone.
    backend: one of BACKENDS (see the module docstring).
    """
    _check(r, k, v, w, u, state)
    if doc_start is not None:
        _check_doc_start(r, doc_start)
    kernel = _choose(backend, r, w, u, state)
    if kernel is _fla_op:
        return _fla_op(r, k, v, w, u, state, doc_start)
    if kernel is not None:
        if doc_start is not None:
            return wkv6_with_doc_starts(kernel, r, k, v, w, u, state, doc_start)
        return kernel(r, k, v, w, u, state)
    return wkv6_chunked(r, k, v, w, u, state, doc_start=doc_start)

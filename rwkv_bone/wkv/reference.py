"""The WKV6 recurrence written the obvious way: the source of truth for every fast path.

Per batch and head, with row vectors r_t, k_t, v_t of size N and S (N x N, rows = key channel):
    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t)
    S_t = diag(d_t) S_{t-1} + k_t^T v_t,      d_t = exp(-exp(w_t))
Works in whatever dtype it is given (use float64 in tests); autograd provides the gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor


def wkv6_reference(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """r, k, v, w: (B, T, H, N); u: (H, N); state: (B, H, N, N) or None -> y (B, T, H, N), state."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state
    d = torch.exp(-torch.exp(w))  # (B, T, H, N), per key channel
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N, N) = k_t^T v_t
        y = torch.einsum("bhi,bhij->bhj", r[:, t], S + u[None, :, :, None] * kv)
        ys.append(y)
        S = d[:, t, :, :, None] * S + kv
    y = torch.stack(ys, dim=1) if T > 0 else r.new_zeros(B, 0, H, N)
    return y, S

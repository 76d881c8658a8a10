"""Document starts for a token-by-token WKV6 op (the CUDA kernel, the reference), no new interface.

A document starting at token t needs y_t = r_t diag(u) k_t^T v_t and S_t = k_t^T v_t, i.e. the
carried S_{t-1} must vanish from both. With w_t = RESET_W the op's decay is d_t =
exp(-exp(RESET_W)) = exp(-4.9e8), exactly 0 in float32 and float64, so
    S_t = 0 * S_{t-1} + k_t^T v_t                                  (exact, and finite: no inf)
and every later token of the document sees only this document. The op's y_t still holds
r_t S_{t-1}; it is replaced by the bonus term computed here, (r_t . u . k_t) v_t, so the op's
y_t (and with it any gradient towards the previous document through y_t) is discarded, and the
gradient through S_t is multiplied by d_t = 0. The gradient of the original w_t is 0, as it is
for a document's first token run alone (its decay multiplies the zero state).
The chunked path handles document starts natively (chunked.py), since a decay of exp(-4.9e8)
inside its cumulative log-decays would cancel catastrophically.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

RESET_W = 20.0  # exp(-exp(20)) underflows to exactly 0; exp(20) = 4.9e8 stays finite in float32

WKVOp = Callable[..., tuple[Tensor, Tensor]]


def wkv6_with_doc_starts(op: WKVOp, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
                         state: Tensor | None, doc_start: Tensor) -> tuple[Tensor, Tensor]:
    """op(r, k, v, w, u, state) with the state zeroed before each token marked in doc_start (B, T)."""
    mark = doc_start[:, :, None, None]  # (B, T, 1, 1)
    w = torch.where(mark, torch.full_like(w, RESET_W), w)
    y, s = op(r, k, v, w, u, state)
    dt = torch.promote_types(y.dtype, torch.float32)
    bonus = (r.to(dt) * u.to(dt) * k.to(dt)).sum(-1, keepdim=True) * v.to(dt)  # (B, T, H, N)
    return torch.where(mark, bonus.to(y.dtype), y), s

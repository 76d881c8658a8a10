"""WKV6 on flash-linear-attention's Triton kernels (optional: `pip install rwkv-bone[fla]`).

fla.ops.rwkv6 solves, per sequence and head, in [B, T, H, K] layout,
    o_t = (q_t * scale) (h_{t-1} + diag(u) k_t^T v_t),   h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t
with g the LOG of the per-step decay. Ours (reference.py) has d_t = exp(-exp(w_t)), so we pass
g = -exp(w) (float32), q = r, scale = 1.0, u (H, K), initial_state = our state (rows = key
channel, as fla's [N, H, K, V]). Two kernels:
- mode "chunk" (`chunk_rwkv6`, chunks of 64, the training path): every gradient, the final
  state's cotangent included;
- mode "recurrent" (`fused_recurrent_rwkv6`, token by token): its backward ignores the final
  state's cotangent, which infctx and state tuning need. We get it exactly by appending N
  read-out tokens to every sequence: r = e_i (one-hot), k = v = 0, g = 0 (decay 1), so the state
  is unchanged and o_{T+i} = row i of S_T; the final state is returned as
  ht + (readout - readout.detach()) (ht's float32 value, the read-out's gradient). Costs N extra
  tokens per row, only when a gradient is being recorded.
Document starts (packed rows, doc_start (B, T)): the B rows are flattened into one row of
B * T' tokens cut at every row start and every marked token (`cu_seqlens`, fla's varlen mode);
a segment that starts a document starts from zero, a row's first segment otherwise from the
row's state, and the row's final state is its last segment's. This needs doc_start on the host
(one device sync per call). Every doc_start is mappable this way.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import UserError

FLA_MODES = ("chunk", "recurrent")
INSTALL_HINT = "install the optional kernels with `pip install rwkv-bone[fla]` (flash-linear-attention and triton)"


class FLAUnavailableError(UserError, ImportError):
    """flash-linear-attention / triton is not installed."""


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True when fla.ops.rwkv6 (and triton) import."""
    try:
        import fla.ops.rwkv6  # noqa: F401
    except Exception:  # ImportError, or a triton that fails to initialise
        return False
    return True


def _kernels():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except Exception as exc:
        raise FLAUnavailableError(f"wkv6: the fla backend needs flash-linear-attention ({exc}); "
                                  f"{INSTALL_HINT}.") from exc
    return {"chunk": chunk_rwkv6, "recurrent": fused_recurrent_rwkv6}


def _segments(doc_start: Tensor, B: int, T: int, Tp: int):
    """cu_seqlens over B rows of Tp tokens (the first T real) cut at row starts and marked tokens.
    Returns cu_seqlens (S + 1) int64 on the host, each segment's row (S), whether it continues the
    row's state (S) and each row's last segment (B)."""
    ds = doc_start.detach().to("cpu", torch.bool)
    cut = torch.zeros(B, Tp, dtype=torch.bool)
    cut[:, :T] = ds
    cut[:, 0] = True
    b, t = cut.nonzero(as_tuple=True)  # row-major: sorted by flat position
    starts = b * Tp + t
    cu = torch.cat([starts, torch.tensor([B * Tp])]).long()
    carry = (t == 0) & ~ds[b, 0]  # T > 0 here
    last = torch.searchsorted(starts, (torch.arange(B) + 1) * Tp) - 1
    return cu, b, carry, last


def wkv6_fla(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None,
    doc_start: Tensor | None = None, *, mode: str = "chunk",
) -> tuple[Tensor, Tensor]:
    """WKV6 on fla's kernels (no argument checks; use `rwkv_bone.wkv.wkv6`).

    r, k, v: (B, T, H, N) in float32 / bfloat16 / float16; w raw decay, u (H, N), state
    (B, H, N, N) used in float32. Returns y in r's dtype and the final state in float32.
    """
    if mode not in FLA_MODES:
        raise ValueError(f"wkv6_fla: mode must be one of {FLA_MODES}, got {mode!r}")
    kernel = _kernels()[mode]
    B, T, H, N = r.shape
    s0 = None if state is None else state.float()
    if T == 0:
        return r.new_zeros(B, 0, H, N), (r.new_zeros(B, H, N, N, dtype=torch.float32) if s0 is None else s0.clone())
    dt = r.dtype
    r, k, v = r.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous()
    g = -torch.exp(w.float())  # (B, T, H, N) log decay
    u = u.float().contiguous()
    readout = mode == "recurrent" and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, k, v, w, u, state))
    R = N if readout else 0
    if R:
        eye = torch.eye(N, device=r.device, dtype=dt)[None, :, None, :].expand(B, N, H, N)
        zero = r.new_zeros(B, N, H, N)
        r, k, v = torch.cat([r, eye], 1), torch.cat([k, zero], 1), torch.cat([v, zero], 1)
        g = torch.cat([g, g.new_zeros(B, N, H, N)], 1)
    Tp = T + R
    if doc_start is None:
        y, ht = kernel(r, k, v, g.contiguous(), u, scale=1.0, initial_state=s0, output_final_state=True)
    else:
        cu, seg_row, carry, last = _segments(doc_start, B, T, Tp)
        dev = r.device
        h0 = None
        if s0 is not None:
            h0 = (s0[seg_row.to(dev)] * carry.to(dev, torch.float32)[:, None, None, None]).contiguous()
        flat = lambda x: x.reshape(1, B * Tp, H, N).contiguous()  # noqa: E731
        extra = {"cu_seqlens_cpu": cu} if mode == "chunk" else {}
        y, ht = kernel(flat(r), flat(k), flat(v), flat(g), u, scale=1.0, initial_state=h0,
                       output_final_state=True, cu_seqlens=cu.to(dev), **extra)
        y, ht = y.reshape(B, Tp, H, N), ht[last.to(dev)]
    if R:
        rows = y[:, T:].permute(0, 2, 1, 3).float()  # (B, H, N, N): o_{T+i} = row i of S_T
        ht = ht + (rows - rows.detach())
        y = y[:, :T]
    return y.to(dt), ht.float()

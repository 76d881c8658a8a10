"""WKV6 in chunked (parallel) form: the fast pure-PyTorch path, forward and hand-written backward.

Per batch and head the recurrence (see reference.py) is
    y_t = r_t S_{t-1} + (r_t . u . k_t) v_t,     S_t = diag(d_t) S_{t-1} + k_t^T v_t,
with d_t = exp(lw_t), lw_t = -exp(w_t) <= 0. Split T into chunks of L steps. Inside a chunk let
A_t = sum_{s<=t} lw_s (inclusive cumulative log-decay per key channel, restarting every chunk) and
Ax_t = A_{t-1} (exclusive, Ax_0 = 0). With S0 the state entering the chunk:

    y_t   = (r_t * exp(Ax_t)) S0                         inter-chunk: one (L, N) @ (N, N) matmul
          + sum_{s<=t} P[t, s] v_s                       intra-chunk: one (L, L) @ (L, N) matmul
    P[t, s] = sum_n r_tn k_sn exp(Ax_tn - A_sn)  (s < t),      P[t, t] = sum_n r_tn u_n k_tn
    S_end = exp(A_L) S0 + (k * exp(A_L - A))^T V         state passed to the next chunk (a scan)

All the exponentials above have arguments <= 0. The intra-chunk weights are split per channel:
- a "weak" channel (chunk log-decay A_L >= -STRONG) is factored, P += (r exp(Ax)) (k exp(-A))^T,
  a matmul; exp(-A) <= exp(STRONG) is the one exponential with a positive argument, and it is
  bounded, so nothing overflows and no inf ever meets a 0;
- a "strong" channel (decay below exp(-STRONG) over the chunk, e.g. w = +2.5, a decay of 5e-6 per
  step) would overflow that factorisation, so its L x L weights exp(Ax_t - A_s), s < t, are built
  explicitly (arguments <= 0) for just those (chunk, batch, head, channel) instances.
A channel is strong only where w averages above ~0.2 over a chunk (exp(w) > 40/32), so on usual
decays nearly all the work is batched matmuls. Chunks of 32
balance the (L, L) intra-chunk matmuls against the N x N states that the scan carries per chunk.

Backward (hand-written; P, the chunk-entry states and the decay factors are saved):
    gP = gY V^T,  gV = P^T gY + (k exp(A_L - A)) G_end,  G_c = dL/dS entering chunk c:
    G_c = exp(A_L) G_{c+1} + (r exp(Ax))^T gY_c            (reverse scan, G_0 = dL/dstate)
and the decay gradient follows from dL/dA and dL/dAx by reverse cumulative sums,
    dL/dlw_t = sum_{t'>=t} dL/dA_t' + sum_{t'>t} dL/dAx_t',     dL/dw = dL/dlw * lw.
Computation runs in float32 for half-precision inputs (float64 stays float64).

Document starts (packed samples, `doc_start` (B, T) bool: the state is zero before each marked
token): the sequence is re-laid out so that every document begins on a chunk boundary (each
document is followed by zero-padding, k = v = 0 and lw = 0, up to a multiple of L; the padding
leaves the state unchanged). A reset then only ever happens between chunks, and the scan drops the
incoming state there: with keep_c = 0 for a chunk c that starts a document,
    S_all[c] = keep_c (exp(A_L) S_all[c-1] + (k exp(A_L - A))^T V),
i.e. the factors exp(A_L) and exp(A_L - A) of chunk c-1 are multiplied by keep_c (exact zeros,
so nothing of the previous document leaks, and the backward follows unchanged). Inside a chunk
every document is computed exactly as it would be alone (same chunk boundaries).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK = 32
STRONG = 40.0  # chunk log-decay beyond which a channel's intra-chunk weights are built pairwise
# (factors up to exp(40) ~ 2e17 keep 1e20 of float32 headroom for the values they multiply)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _to_chunks(x: Tensor, nc: int, L: int) -> Tensor:
    """(B, T, H, N) -> (nc, B, H, L, N) contiguous, zero-padded at the end of T."""
    B, T, H, N = x.shape
    pad = nc * L - T
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, nc, L, H, N).permute(1, 0, 3, 2, 4).contiguous()


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """(nc, B, H, L, N) -> (B, T, H, N) contiguous, dropping the padding."""
    nc, B, H, L, N = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)[:, :T].contiguous()


class _Chunks:
    """Cumulative log-decays of each chunk and the factors built from them."""

    def __init__(self, lw: Tensor, strong_limit: float, carry: Tensor | None = None):
        """carry: (nc, B) 0/1, 0 where the state leaving chunk c is dropped (a document starts
        at chunk c + 1); None = always carried."""
        nc, B, H, L, N = lw.shape
        self.A = lw.cumsum(-2)  # (nc, B, H, L, N) inclusive
        # Exclusive cumsum by shifting (exact, so Ax_t <= A_s holds bit for bit for s < t).
        self.Ax = torch.nn.functional.pad(self.A[..., :-1, :], (0, 0, 1, 0))
        A_end = self.A[..., -1:, :]  # (nc, B, H, 1, N)
        self.r_decay = self.Ax.exp()  # exp(Ax_t): chunk start to r_t
        self.k_decay = (A_end - self.A).exp_()  # exp(A_L - A_s): k_s to the chunk end
        self.end_decay = A_end.exp().transpose(-1, -2)  # (nc, B, H, N, 1) whole chunk
        if carry is not None:  # exact zeros where the next chunk starts a document
            keep = carry.to(lw.dtype).view(nc, B, 1, 1, 1)
            self.k_decay.mul_(keep)
            self.end_decay.mul_(keep)
        strong = A_end < -strong_limit  # (nc, B, H, 1, N)
        # Weak channels: k exp(-A) with -A <= strong_limit; strong ones get 0 (never exp(+big)).
        if strong.any():
            self.k_grow = (-self.A).masked_fill_(strong, 0.0).exp_().masked_fill_(strong, 0.0)
        else:
            self.k_grow = (-self.A).exp_()
        self.strong = strong.squeeze(-2).nonzero(as_tuple=True)  # 4 index tensors (c, b, h, n)
        c, b, h, _ = self.strong
        self.flat = (c * B + b) * H + h  # index into P.view(-1, L, L)
        self.lower = torch.ones(L, L, dtype=torch.bool, device=lw.device).tril_(-1)  # s < t
        if not self.flat.numel():
            self.A = self.Ax = None  # only the explicit (strong) path needs them later

    def take(self, x: Tensor) -> Tensor:
        """The strong instances of x (nc, B, H, L, N) as (n_strong, L)."""
        c, b, h, n = self.strong
        return x[c, b, h, :, n]

    def strong_pairs(self) -> Tensor:
        """exp(Ax_t - A_s) for s < t (else 0) per strong instance: (n_strong, L, L)."""
        diff = self.take(self.Ax).unsqueeze(-1) - self.take(self.A).unsqueeze(-2)
        return diff.masked_fill_(~self.lower, float("-inf")).exp_()


def _forward(r: Tensor, k: Tensor, v: Tensor, u: Tensor, ch: _Chunks, s0: Tensor):
    """r, k, v: (nc, B, H, L, N); u: (H, N); s0: (B, H, N, N). Returns y, P, states S_all."""
    nc, B, H, L, N = r.shape
    # Products kept for the backward: Rd = r exp(Ax), Kg = k exp(-A) (weak), Kd = k exp(A_L - A).
    ch.Rd, ch.Kg, ch.Kd = Rd, Kg, Kd = r * ch.r_decay, k * ch.k_grow, k * ch.k_decay
    P = (Rd @ Kg.transpose(-1, -2)).tril_(-1)  # (nc, B, H, L, L) weak channels
    if ch.flat.numel():
        E = ch.strong_pairs().mul_(ch.take(r).unsqueeze(-1)).mul_(ch.take(k).unsqueeze(-2))
        P.view(-1, L, L).index_add_(0, ch.flat, E)
    P.diagonal(dim1=-2, dim2=-1).copy_(torch.linalg.vecdot(r * u[:, None, :], k))  # bonus
    U = Kd.transpose(-1, -2) @ v  # (nc, B, H, N, N) chunk-local state
    S_all = r.new_empty(nc + 1, B, H, N, N)  # S_all[c] = state entering chunk c
    S_all[0] = s0
    for c in range(nc):
        torch.addcmul(U[c], ch.end_decay[c], S_all[c], out=S_all[c + 1])
    y = P @ v
    y.view(-1, L, N).baddbmm_(Rd.view(-1, L, N), S_all[:-1].view(-1, N, N))
    return y, P, S_all


def _backward(r, k, v, u, ch: _Chunks, P, S_all, gy, g_final):
    """Gradients for r, k, v, lw (chunk layout), u (H, N) and the initial state."""
    nc, B, H, L, N = r.shape
    gP = gy @ v.transpose(-1, -2)  # (nc, B, H, L, L)
    gv = P.transpose(-1, -2) @ gy
    gb = gP.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clone()  # (nc, B, H, L, 1) bonus
    gP.tril_(-1)

    # Reverse scan of the state gradient: G_all[c] = dL/dS_all[c].
    Rd, Kg, Kd = ch.Rd, ch.Kg, ch.Kd
    RG = Rd.transpose(-1, -2) @ gy  # (nc, B, H, N, N)
    G_all = torch.empty_like(S_all)
    G_all[nc] = g_final
    for c in reversed(range(nc)):
        torch.addcmul(RG[c], ch.end_decay[c], G_all[c + 1], out=G_all[c])
    gU = G_all[1:]
    S_in = S_all[:-1]

    # Everything that reaches r through Rd = r exp(Ax): the inter-chunk state and weak channels.
    gRd = gy @ S_in.transpose(-1, -2)  # (nc, B, H, L, N)
    gRd.view(-1, L, N).baddbmm_(gP.view(-1, L, L), Kg.view(-1, L, N))
    gr = gRd * ch.r_decay
    gAx = gRd.mul_(Rd)
    gKg = gP.transpose(-1, -2) @ Rd  # weak channels through k exp(-A)
    gk = gKg * ch.k_grow
    gA = gKg.mul_(Kg).neg_()
    gKd = v @ gU.transpose(-1, -2)  # the state update through k exp(A_L - A)
    gk.addcmul_(gKd, ch.k_decay)
    gv.view(-1, L, N).baddbmm_(Kd.view(-1, L, N), gU.reshape(-1, N, N))
    gKK = gKd.mul_(Kd)
    gA -= gKK
    gA_end = torch.linalg.vecdot(gU, S_in).unsqueeze(-2) * ch.end_decay.transpose(-1, -2)
    gA[..., -1:, :] += gA_end + gKK.sum(-2, keepdim=True)

    if ch.flat.numel():  # strong channels: explicit weights exp(Ax_t - A_s)
        rs, ks = ch.take(r), ch.take(k)
        W = ch.strong_pairs().mul_(gP.view(-1, L, L)[ch.flat])  # (n_strong, L, L)
        grs = (W * ks.unsqueeze(-2)).sum(-1)  # (n_strong, L)
        gks = (W.mul_(rs.unsqueeze(-1))).sum(-2)
        for g, add in ((gr, grs), (gk, gks), (gAx, rs * grs), (gA, -ks * gks)):
            view = g.transpose(-1, -2)  # (nc, B, H, N, L) view of g: one strong row per index
            c, b, h, n = ch.strong
            view[c, b, h, n] += add

    ub = u[:, None, :]
    gbk = gb * k
    gr.addcmul_(gbk, ub)
    gk.addcmul_(gb * r, ub)
    gu = gbk.mul_(r).sum(dim=(0, 1, 3))  # (H, N)

    # Back from A (inclusive) and Ax (exclusive cumsum) to lw:
    # glw_t = sum_{t'>=t} (gA + gAx)_t' - gAx_t = total - cumsum_t + gA_t.
    gsum = gA + gAx
    glw = gA.sub_(gsum.cumsum(-2)).add_(gsum.sum(-2, keepdim=True))
    return gr, gk, gv, glw, gu, G_all[0]


class WKV6Chunked(torch.autograd.Function):
    """Autograd Function on compute-dtype tensors in (B, T, H, N) layout (see module docstring)."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, chunk: int, strong_limit: float, carry=None):
        B, T, H, N = r.shape
        L = max(1, min(chunk, T))
        nc = -(-T // L)
        lw = torch.exp(w).neg_()  # (B, T, H, N) log-decay; padding: lw = 0 (decay 1), k = v = 0
        rc, kc, vc, lwc = (_to_chunks(x, nc, L) for x in (r, k, v, lw))
        ch = _Chunks(lwc, strong_limit, carry)
        yc, P, S_all = _forward(rc, kc, vc, u, ch, s0)
        ctx.save_for_backward(rc, kc, vc, lw, u, P, S_all, carry)
        # The decay factors are rebuilt from lw in backward rather than kept on ctx: tensors held
        # outside save_for_backward would escape activation checkpointing (grad_cp, infctx).
        ctx.T, ctx.strong_limit = T, strong_limit
        return _from_chunks(yc, T), S_all[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_final):
        rc, kc, vc, lw, u, P, S_all, carry = ctx.saved_tensors
        nc, B, H, L, N = rc.shape
        gyc = rc.new_zeros(rc.shape) if gy is None else _to_chunks(gy.to(rc.dtype), nc, L)
        g_final = rc.new_zeros(B, H, N, N) if g_final is None else g_final.to(rc.dtype)
        with torch.autocast(device_type=rc.device.type, enabled=False):
            ch = _Chunks(_to_chunks(lw, nc, L), ctx.strong_limit, carry)
            ch.Rd, ch.Kg, ch.Kd = rc * ch.r_decay, kc * ch.k_grow, kc * ch.k_decay  # as in _forward
            gr, gk, gv, glw, gu, g_state = _backward(rc, kc, vc, u, ch, P, S_all, gyc, g_final)
        T = ctx.T
        gw = _from_chunks(glw, T).mul_(lw)
        return (_from_chunks(gr, T), _from_chunks(gk, T), _from_chunks(gv, T), gw, gu, g_state,
                None, None, None)


def _doc_layout(doc_start: Tensor, L: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where each token goes when every document is padded to a multiple of L.

    doc_start (B, T) bool. Returns pos (B, T) new position of each token, src (B, Tp) the token
    at each new position (T = padding), carry (nc, B) 0/1 (0: chunk c + 1 starts a document), and
    Tp (a multiple of L)."""
    B, T = doc_start.shape
    dev = doc_start.device
    t = torch.arange(T, device=dev).expand(B, T)
    # Segment of each token (the part before the first marked token, if any, is segment 0).
    seg = doc_start.long().cumsum(1) - doc_start[:, :1].long()  # (B, T)
    start = torch.where(doc_start, t, torch.zeros_like(t)).cummax(1).values  # its segment's start
    lens = torch.zeros(B, T, dtype=torch.long, device=dev).scatter_add_(1, seg, torch.ones_like(seg))
    padded = (lens + L - 1) // L * L  # (B, T) per segment
    seg_pos = padded.cumsum(1) - padded  # new start of each segment
    pos = seg_pos.gather(1, seg) + (t - start)
    Tp = max(L, int(padded.sum(1).max()))
    src = torch.full((B, Tp), T, dtype=torch.long, device=dev).scatter_(1, pos, t.contiguous())
    nc = Tp // L
    starts = torch.zeros(B, nc + 1, dtype=torch.bool, device=dev)  # column nc: unmarked tokens
    starts.scatter_(1, torch.where(doc_start, pos // L, nc), True)
    carry = (~starts[:, 1:nc]).T  # (nc - 1, B): whether the state leaving chunk c enters c + 1
    carry = torch.cat([carry, carry.new_ones(1, B)]).contiguous()  # the last chunk's is the final
    return pos, src, carry, Tp


def _with_doc_starts(r, k, v, w, u, s0, doc_start, L, strong_limit):
    """Chunked WKV6 with the state zeroed before each marked token (module docstring)."""
    B, T, H, N = r.shape
    pos, src, carry, Tp = _doc_layout(doc_start, L)
    rows = torch.arange(B, device=r.device)[:, None]  # (B, 1)

    def relayout(x: Tensor, fill: float) -> Tensor:  # (B, T, H, N) -> (B, Tp, H, N)
        return torch.cat([x, x.new_full((B, 1, H, N), fill)], 1)[rows, src]

    # Padding: k = v = 0 and w = -inf (lw = -exp(w) = 0: decay exactly 1), so it changes nothing.
    rp, kp, vp = (relayout(x, 0.0) for x in (r, k, v))
    wp = relayout(w, float("-inf"))
    s0 = s0 * (~doc_start[:, 0]).to(s0.dtype).view(B, 1, 1, 1)  # a document at t = 0 starts clean
    yp, S = WKV6Chunked.apply(rp, kp, vp, wp, u, s0, L, strong_limit, carry.to(r.dtype))
    return yp[rows, pos], S


def wkv6_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None,
    chunk: int = CHUNK, strong_limit: float = STRONG, doc_start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV6 without argument checks (use `rwkv_bone.wkv.wkv6`).

    r, k, v, w: (B, T, H, N); u: (H, N); state: (B, H, N, N) or None. Returns y in r's dtype and the
    final state in the compute dtype (float32, or float64 when any input is float64).
    `strong_limit` (keep exp(strong_limit) far below the float32 maximum) only moves work between
    the factored and the explicit intra-chunk form; the result is the same.
    doc_start (B, T) bool: the state is zero before each marked token (packed documents).
    """
    B, T, H, N = r.shape
    dt = compute_dtype(r, k, v, w, u, state)
    s0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N), s0.clone()
    if doc_start is not None:
        with torch.autocast(device_type=r.device.type, enabled=False):
            y, S = _with_doc_starts(r.to(dt), k.to(dt), v.to(dt), w.to(dt), u.to(dt), s0, doc_start,
                                    max(1, min(chunk, T)), strong_limit)
        return y.to(r.dtype), S
    # The algorithm chooses its own precision; an enclosing autocast must not recast its matmuls.
    with torch.autocast(device_type=r.device.type, enabled=False):
        y, S = WKV6Chunked.apply(
            r.to(dt), k.to(dt), v.to(dt), w.to(dt), u.to(dt), s0, chunk, strong_limit
        )
    return y.to(r.dtype), S

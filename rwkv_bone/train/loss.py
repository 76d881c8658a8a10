"""Next-token cross-entropy over the head, whole or in token chunks, with RWKV's optional L2Wrap.

loss = sum_t w_t * l_t,  l_t = logsumexp(z_t) - z_t[y_t],  z_t = head(h_t) in fp32,
w_t = 1 / (number of positions)               without a mask,
w_t = m_t / max(1, sum_t m_t)                 with an sft loss mask m (1 = response token).

Chunked (`chunked_token_loss`): the positions are cut into chunks of `chunk_tokens`; each chunk's
head matmul + log-softmax + weighted NLL runs under non-reentrant activation checkpointing, which
keeps only the chunk's hidden states and recomputes its logits in backward. So neither the (B, T, V)
logits nor their gradient ever exists whole: peak extra memory is one chunk's (chunk, V) logits and
gradient. The head is called as a module (not through its weight), so DeepSpeed ZeRO-3 gathers it as
usual and autocast applies exactly as on the plain path: loss and gradients equal the plain path's.

Fused (`fused_token_loss`, train.py's path for a plain bias-free head): forward applies the head
once per chunk and forms the chunk's logit gradient with the same ops as F.cross_entropy's backward
(plus the L2Wrap term), g = w_t * (softmax(z_t) - onehot(y_t)) (n_c, V), then keeps only
dL/dh = g @ W (N, C) and, when the head trains, dL/dW += g^T @ h (V, C, fp32 accumulator over the
chunks); backward only scales what forward kept (all but the L2Wrap term, see below). So the head
runs once per token instead of twice (three head-sized matmuls per token, as on the plain path),
with the chunked path's logit gradient bit for bit. Extra memory: three (chunk, V) fp32 buffers
reused by every chunk, dL/dh, and dL/dW (which the plain path holds too).
dL/dW is returned to autograd as the weight input's gradient, so .grad accumulates over
micro-batches and DeepSpeed's gradient hooks see it as usual. It uses the weight tensor directly,
so it is not for a ZeRO-3 partitioned head (callers fall back to the chunked path).

L2Wrap (RWKV-LM): the loss value is unchanged, but backward adds, at every position, a gradient of
max_v(z_t) * 1e-4 / (number of positions) on that position's largest logit, which keeps the logits
from drifting upwards. The number of positions is B*T of the whole batch (as in RWKV-LM), masked or
not, so chunking does not change it. That term is NOT scaled by the loss's incoming gradient (RWKV-LM's
L2Wrap.backward returns it as is): multiplying the loss by s (Lightning divides it by
--accumulate_grad_batches, a loss scaler multiplies it) scales the cross-entropy gradient by s and
leaves the L2Wrap one alone. Every path here, the fused one included, does exactly that.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

L2WRAP_SCALE = 1e-4
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): 256 tokens at V = 65536


class L2Wrap(torch.autograd.Function):
    """Identity on `loss`; backward puts max(z) * factor on each row's largest logit of z (N, V)."""

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, factor: float) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (logits,) = ctx.saved_tensors
        top, idx = logits.max(dim=-1, keepdim=True)
        g = torch.zeros_like(logits).scatter_(-1, idx, top * ctx.factor)
        return grad_loss, g, None


def position_weights(y: Tensor, mask: Tensor | None) -> Tensor:
    """w (B, T) float32 such that loss = sum(w * nll) (see the module docstring)."""
    if mask is None:
        return torch.full(y.shape, 1.0 / y.numel(), dtype=torch.float32, device=y.device)
    m = mask.to(torch.float32)
    return m / m.sum().clamp(min=1.0)


def _weighted_nll(logits: Tensor, y: Tensor, w: Tensor, l2wrap_factor: float) -> Tensor:
    """logits (N, V) any float dtype, y (N,), w (N,) -> sum_n w_n * nll_n (fp32 scalar)."""
    z = logits.float()
    loss = (F.cross_entropy(z, y, reduction="none") * w).sum()
    if l2wrap_factor:
        loss = L2Wrap.apply(loss, z, l2wrap_factor)
    return loss


def token_loss(logits: Tensor, y: Tensor, mask: Tensor | None = None, l2wrap: bool = False) -> Tensor:
    """Plain path: logits (B, T, V), y (B, T) int64, mask (B, T) or None -> scalar fp32 loss."""
    w = position_weights(y, mask)
    factor = L2WRAP_SCALE / y.numel() if l2wrap else 0.0
    return _weighted_nll(logits.flatten(0, 1), y.flatten(), w.flatten(), factor)


def chunk_size(vocab_size: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's logits hold about `elements` values."""
    return max(1, elements // max(1, vocab_size))


def chunked_token_loss(head: Callable[[Tensor], Tensor], h: Tensor, y: Tensor, mask: Tensor | None = None,
                       *, weights: Tensor | None = None, l2wrap: bool = False,
                       chunk_tokens: int | None = None, n_positions: int | None = None) -> Tensor:
    """Chunked path: `head` maps hidden states (N, C) to logits (N, V) (the model's head module);
    h (B, T, C) are the hidden states after ln_out, y (B, T), mask (B, T) or None. Same value and
    gradients as token_loss(head(h), y, mask, l2wrap) without holding (B, T, V).

    weights (B, T) (default position_weights(y, mask)) and n_positions (default B*T) let a caller
    (infctx) split one sample's loss over several calls: pass the slice of the whole sample's
    weights and the whole sample's position count, and the calls' sum is the whole loss."""
    B, T, C = h.shape
    hf, yf = h.reshape(B * T, C), y.reshape(B * T)
    w = (position_weights(y, mask) if weights is None else weights.to(torch.float32)).reshape(B * T)
    factor = L2WRAP_SCALE / (n_positions or y.numel()) if l2wrap else 0.0
    if chunk_tokens is None:
        chunk_tokens = chunk_size(getattr(head, "out_features", 65536))

    def piece(hc: Tensor, yc: Tensor, wc: Tensor) -> Tensor:
        return _weighted_nll(head(hc), yc, wc, factor)

    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, B * T, chunk_tokens):
        e = min(s + chunk_tokens, B * T)
        if torch.is_grad_enabled():
            part = checkpoint(piece, hf[s:e], yf[s:e], w[s:e], use_reentrant=False)
        else:
            part = piece(hf[s:e], yf[s:e], w[s:e])
        total = total + part
    return total


class _FusedHeadLoss(torch.autograd.Function):
    """The loss of a head in one pass: forward forms each chunk's logit gradient
    g = w_t * (softmax(z_t) - onehot(y_t)) + the L2Wrap term, and keeps dL/dh = g @ W (N, C) and, when
    the head trains, dL/dW = sum over chunks of g^T @ h (V, C), accumulated in fp32 (float64 stays)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, y: Tensor, w: Tensor, factor: float, chunk_tokens: int,
                want_dh: bool, want_dw: bool) -> Tensor:
        n, C, V = h.shape[0], h.shape[1], weight.shape[0]
        dev = h.device
        # The head's compute dtype as on the module path (bf16 under autocast, else the tensors'):
        # asked of autocast with a 1 x 1 product, then the casts are explicit and done once.
        lowp = F.linear(h[:1], weight[:1]).dtype
        acc = torch.promote_types(lowp, torch.float32)  # dW accumulates in fp32 (float64 stays)
        rows = torch.arange(min(chunk_tokens, n), device=dev) * V  # flat offsets of each row's start
        with torch.autocast(dev.type, enabled=False):
            wl = weight.to(lowp)  # (V, C)
            dh = torch.empty_like(h) if want_dh else None
            dw = torch.zeros(V, C, dtype=acc, device=dev) if want_dw else None
            top = torch.empty(n, 1, dtype=torch.float32, device=dev) if factor else None
            idx = torch.empty(n, 1, dtype=torch.long, device=dev) if factor else None
            # Three (chunk, V) fp32 buffers reused by every chunk: on the CPU each fresh 64 MB tensor
            # costs about as much in page faults as a pass over it.
            bufs = [torch.empty(min(chunk_tokens, n), V, dtype=torch.float32, device=dev) for _ in range(3)]
            total = torch.zeros((), dtype=torch.float32, device=dev)
            for s in range(0, n, chunk_tokens):
                e = min(s + chunk_tokens, n)
                hc, yc, wc = h[s:e].to(lowp), y[s:e], w[s:e]  # (n_c, C), (n_c,), (n_c,)
                z, lsm, g = (b[:e - s] for b in bufs)  # (n_c, V) each: logits, log-softmax, gradient
                if lowp == torch.float32:
                    torch.mm(hc, wl.t(), out=z)
                else:
                    z.copy_(hc @ wl.t())
                if factor:
                    top[s:e], idx[s:e] = z.max(dim=-1, keepdim=True)
                torch.log_softmax(z, dim=-1, out=lsm)
                total = total + (-lsm.gather(-1, yc[:, None]).squeeze(-1) * wc).sum()
                if not (want_dh or want_dw):
                    continue
                # F.cross_entropy's backward (d loss / d lsm, then log_softmax's backward), so g is
                # bit for bit the chunked path's: g = w_t * (softmax(z_t) - onehot(y_t))
                g_out = z.zero_().scatter_(-1, yc[:, None], -wc[:, None])  # the logits are done with
                torch.ops.aten._log_softmax_backward_data.out(g_out, lsm, -1, torch.float32, out=g)
                if factor:  # + the L2Wrap term on each row's largest logit
                    g.view(-1).index_add_(0, rows[:e - s] + idx[s:e, 0], top[s:e, 0] * factor)
                gl = g if lowp == torch.float32 else g.to(lowp)
                if want_dh:
                    dh[s:e] = (gl @ wl).to(h.dtype)
                if want_dw:
                    if gl.dtype == acc:
                        dw.addmm_(gl.t(), hc)
                    else:
                        dw += gl.t() @ hc
                del gl
        ctx.factor = factor
        ctx.flags = (want_dh, want_dw)
        ctx.lowp, ctx.weight_dtype = lowp, weight.dtype
        keep_h = h if (factor and want_dw) else None
        ctx.save_for_backward(dh, dw, top, idx, weight if factor and want_dh else None, keep_h)
        return total

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dh, dw, top, idx, weight, h = ctx.saved_tensors
        want_dh, want_dw = ctx.flags
        s = grad_loss.float()
        gh = gw = None
        # L2Wrap's term is not scaled by grad_loss (RWKV-LM's L2Wrap returns it as is, and so does the
        # plain path): dh and dw hold the whole gradient at grad_loss = 1, so add (1 - s) x that term.
        # At s = 1 this adds exact zeros: the result is then the forward's numbers bit for bit.
        if want_dh:
            gh = dh * s.to(dh.dtype)
            if ctx.factor:
                acc = torch.promote_types(dh.dtype, torch.float32)
                c = ((1 - s) * ctx.factor * top).to(acc)  # (N, 1)
                rows = weight[idx[:, 0]].to(ctx.lowp).to(acc)  # (N, C): the row of each position's top logit
                gh = gh + (c * rows).to(dh.dtype)
        if want_dw:
            gw = dw * s.to(dw.dtype)
            if ctx.factor:
                c = ((1 - s) * ctx.factor * top).to(dw.dtype)  # (N, 1)
                gw.index_add_(0, idx[:, 0], c * h.to(ctx.lowp).to(dw.dtype))
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None


def fused_head_loss(h: Tensor, head_weight: Tensor, y: Tensor, w: Tensor, l2wrap_factor: float,
                    chunk_tokens: int) -> Tensor:
    """sum_t w_t * nll_t of logits h @ head_weight.T (h (..., C), y and w of h's leading shape), the
    head applied once per token: the logits' gradient is formed in forward chunk by chunk and only
    dL/dh (N, C) and, if head_weight requires grad, dL/dW (V, C) are kept. Backward scales them by
    the loss's incoming gradient, all but the L2Wrap term (l2wrap_factor, 0 for none), which enters
    unscaled as on the plain path. dL/dW reaches head_weight through autograd, so it accumulates
    into .grad over micro-batches as any gradient does."""
    C = h.shape[-1]
    grad = torch.is_grad_enabled()
    return _FusedHeadLoss.apply(h.reshape(-1, C), head_weight, y.reshape(-1), w.reshape(-1).to(torch.float32),
                                float(l2wrap_factor), int(chunk_tokens), grad and h.requires_grad,
                                grad and head_weight.requires_grad)


def fused_token_loss(head_weight: Tensor, h: Tensor, y: Tensor, mask: Tensor | None = None,
                     *, weights: Tensor | None = None, l2wrap: bool = False,
                     chunk_tokens: int | None = None, n_positions: int | None = None) -> Tensor:
    """chunked_token_loss for a bias-free head given by its weight (V, C), frozen or trained: same
    arguments, value and gradients (for h and the weight), without recomputing the head in backward.
    The weight is used as a tensor, so not for a DeepSpeed ZeRO-3 partitioned head (see uses_fused_loss)."""
    w = position_weights(y, mask) if weights is None else weights
    factor = L2WRAP_SCALE / (n_positions or y.numel()) if l2wrap else 0.0
    if chunk_tokens is None:
        chunk_tokens = chunk_size(head_weight.shape[0])
    return fused_head_loss(h, head_weight, y, w, factor, chunk_tokens)


def uses_fused_loss(head: torch.nn.Module) -> bool:
    """Whether the training loss may take `head` through fused_token_loss: a bias-free nn.Linear
    whose weight is a whole tensor (a ZeRO-3 partitioned one, marked ds_id, goes through the module)."""
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not hasattr(head.weight, "ds_id"))


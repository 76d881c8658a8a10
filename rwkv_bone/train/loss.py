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

Fused (`fused_frozen_head_loss`, `frozen_head_token_loss`): when the head weight is frozen (every
adapter method unless the head trains), only dL/dh is needed, so forward forms each chunk's logit
gradient with the same ops as F.cross_entropy's backward (plus the L2Wrap term) and keeps only
dL/dh (N, C): the head runs once per token instead of twice, with the chunked path's numbers. It uses
the weight tensor directly, so it is not for a ZeRO-3 partitioned head (callers fall back).

L2Wrap (RWKV-LM): the loss value is unchanged, but backward adds, at every position, a gradient of
max_v(z_t) * 1e-4 / (number of positions) on that position's largest logit, which keeps the logits
from drifting upwards. The number of positions is B*T of the whole batch (as in RWKV-LM), masked or
not, so chunking does not change it.
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


class _FusedFrozenHeadLoss(torch.autograd.Function):
    """Loss of a frozen head in one pass: forward computes each chunk's logit gradient
    g = w_t * (softmax(z_t) - onehot(y_t)) (+ the L2Wrap term) and keeps only dL/dh = g @ W."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, y: Tensor, w: Tensor, factor: float,
                chunk_tokens: int) -> Tensor:
        n = h.shape[0]
        dh = torch.empty_like(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            zc = F.linear(h[s:e], weight)  # autocast applies as on the module path
            z = zc.float()
            yc, wc = y[s:e], w[s:e]
            # the ops of F.cross_entropy's forward and backward, so g is bit for bit the plain path's
            lsm = torch.log_softmax(z, dim=-1)
            total = total + (-lsm.gather(-1, yc[:, None]).squeeze(-1) * wc).sum()
            top, idx = z.max(dim=-1, keepdim=True) if factor else (None, None)
            lsm_dtype, lowp = z.dtype, zc.dtype
            del z, zc  # at most three (chunk, V) tensors at a time
            g_out = torch.zeros_like(lsm).scatter_(-1, yc[:, None], -wc[:, None])  # d loss / d lsm
            g = torch.ops.aten._log_softmax_backward_data(g_out, lsm, -1, lsm_dtype)
            del g_out, lsm
            if factor:
                g.scatter_add_(-1, idx, top * factor)
            dh[s:e] = (g.to(lowp) @ weight.to(lowp)).to(h.dtype)
            del g
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (dh,) = ctx.saved_tensors
        return grad_loss.to(dh.dtype) * dh, None, None, None, None, None


def fused_frozen_head_loss(h: Tensor, head_weight: Tensor, y: Tensor, w: Tensor, l2wrap_factor: float,
                           chunk_tokens: int) -> Tensor:
    """sum_t w_t * nll_t of logits h @ head_weight.T (h (..., C), y and w of h's leading shape), with
    the head applied once per token and no gradient for head_weight (which must be frozen): the
    logits' gradient is formed in forward chunk by chunk and only dL/dh (N, C) is kept. The L2Wrap
    term (l2wrap_factor, 0 for none) is scaled by the loss's incoming gradient like the rest."""
    C = h.shape[-1]
    return _FusedFrozenHeadLoss.apply(h.reshape(-1, C), head_weight, y.reshape(-1),
                                      w.reshape(-1).to(torch.float32), float(l2wrap_factor), int(chunk_tokens))


def frozen_head_token_loss(head_weight: Tensor, h: Tensor, y: Tensor, mask: Tensor | None = None,
                           *, weights: Tensor | None = None, l2wrap: bool = False,
                           chunk_tokens: int | None = None, n_positions: int | None = None) -> Tensor:
    """chunked_token_loss for a frozen bias-free head given by its weight (V, C): same arguments,
    value and gradient for h, without recomputing the head in backward."""
    w = position_weights(y, mask) if weights is None else weights
    factor = L2WRAP_SCALE / (n_positions or y.numel()) if l2wrap else 0.0
    if chunk_tokens is None:
        chunk_tokens = chunk_size(head_weight.shape[0])
    return fused_frozen_head_loss(h, head_weight, y, w, factor, chunk_tokens)

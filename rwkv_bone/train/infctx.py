"""infctx: the loss of a long sample computed chunk by chunk, with exact gradients in bounded memory.

A sample x (B, T) is cut into chunks x^1 .. x^K of `chunk_ctx` tokens. Chunk k starts from the
state the model had after chunk k-1 (per layer: att token-shift (B, C), WKV state (B, H, N, N) in
fp32, ffn token-shift (B, C)), so the chunks together compute exactly the forward of the whole
sample:  (h^k, S^k) = features(x^k, S^{k-1}),  S^0 = zero state,  and

    loss = sum_k sum_{t in chunk k} w_t * nll_t,   w = position_weights(y, mask) of the WHOLE sample,

which is the whole-sample loss (mean over positions, or the masked mean), L2Wrap included (its
position count is the whole sample's B*T).

Gradients are not truncated: dL/dS^k flows back into chunk k (full backpropagation through the
carried state). Each chunk's features + loss run under non-reentrant activation checkpointing, so
between chunks only the checkpoint inputs (token ids, weights, the carried state tensors) are kept;
backward recomputes one chunk at a time. Peak memory is therefore one chunk's activations plus
K small state sets, whatever T is.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .loss import chunked_token_loss, fused_token_loss, position_weights, uses_fused_loss


def _flatten(state: list[tuple[Tensor, Tensor, Tensor]] | None) -> list[Tensor]:
    # clone: the token-shift states are views x[:, -1] of whole (B, chunk, C) activations, which
    # would otherwise stay alive (one per chunk and layer) until backward
    return [] if state is None else [t.clone() for layer in state for t in layer]


def _unflatten(flat: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    if not flat:
        return None
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]  # type: ignore[misc]


def infctx_loss(model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None, chunk_ctx: int, *,
                l2wrap: bool = False) -> Tensor:
    """Scalar fp32 loss of x (B, T) -> y (B, T) (mask (B, T) or None), processed `chunk_ctx` tokens
    at a time; `model` is an RWKV6 (forward_features(idx, state) and a `head` module).

    Equals chunked_token_loss(model.head, *model.forward_features(x)[:1], y, mask) in value and
    gradients (up to rounding)."""
    B, T = x.shape
    w = position_weights(y, mask)  # (B, T): the whole sample's weights
    n_positions = y.numel()

    def piece(xc: Tensor, yc: Tensor, wc: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        h, new_state = model.forward_features(xc, _unflatten(flat))  # h (B, chunk, C)
        if uses_fused_loss(model.head):  # head applied once per token (twice with this checkpoint)
            loss = fused_token_loss(model.head.weight, h, yc, None, weights=wc, l2wrap=l2wrap,
                                    n_positions=n_positions)
        else:
            loss = chunked_token_loss(model.head, h, yc, None, weights=wc, l2wrap=l2wrap,
                                      n_positions=n_positions)
        return (loss, *_flatten(new_state))

    grad = torch.is_grad_enabled()
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    flat: list[Tensor] = []
    for s in range(0, T, chunk_ctx):
        e = min(s + chunk_ctx, T)
        args = (x[:, s:e], y[:, s:e], w[:, s:e], *flat)
        out = checkpoint(piece, *args, use_reentrant=False) if grad else piece(*args)
        total = total + out[0]
        flat = list(out[1:])
    return total

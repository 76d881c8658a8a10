"""Per-token log-probabilities of given tokens under the model, head applied in token chunks so the
(B, T, V) logits never exist whole (the same chunking as the cross-entropy in train/loss.py)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..loss import chunk_size


def token_logps(model, x: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """x, y (B, T) int64 -> log softmax(head(h_t) / temperature)[y_t] (B, T) float32."""
    h, _ = model.forward_features(x, None, None)          # (B, T, C)
    B, T, C = h.shape
    hf, yf = h.reshape(B * T, C), y.reshape(B * T)
    step = chunk_size(model.config.vocab_size)

    def piece(hc: Tensor, yc: Tensor) -> Tensor:
        z = model.head(hc).float() / temperature          # (n, V)
        return torch.log_softmax(z, dim=-1).gather(-1, yc[:, None]).squeeze(-1)

    parts = []
    for s in range(0, B * T, step):
        hc, yc = hf[s:s + step], yf[s:s + step]
        parts.append(checkpoint(piece, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else piece(hc, yc))
    return torch.cat(parts).reshape(B, T)


__all__ = ["token_logps"]

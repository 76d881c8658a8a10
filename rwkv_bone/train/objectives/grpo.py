"""Group relative policy optimisation (Shao et al. 2024) with the normalisations HF TRL names.

Each prompt q gets G sampled completions o_1..o_G with rewards r_i (eval.py's scorer: 1 / 0):

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)          (dr_grpo: r_i - mean(r), no division)

std is the unbiased one over the group, as TRL computes it; a group whose rewards are all equal has
A = 0 and contributes nothing. Per completion token t (log-probs from logits / temperature):

    rho_t = pi(o_t | ...) / pi_old(o_t | ...)
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t
    KL_t  = pi_ref / pi - log(pi_ref / pi) - 1      (k3 estimator, >= 0)

Normalisation of the sum of l_t over the batch's N completions (mask = completion tokens):
    grpo     mean over each completion's tokens, then over completions
    dapo     sum over all tokens / their count
    dr_grpo  sum over all tokens / (N * max_new_tokens)
Reported: kl (masked token mean of KL_t) and clip_fraction (share of tokens where the clip is the
active side of the min: rho < 1 - eps with A < 0, or rho > 1 + eps with A > 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, scale: bool = True) -> Tensor:
    """rewards (P, G) -> advantages (P, G); scale=False is dr_grpo's (no std division)."""
    if rewards.shape[-1] < 2:
        raise ValueError("GRPO needs at least two completions per prompt to compare them")
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True) + STD_EPS)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              kind: str = "grpo", max_new_tokens: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """logp, old_logp, ref_logp (N, T) per-token log-probs of the sampled tokens; advantages (N,);
    mask (N, T) (1 = completion token). Returns the loss and {kl, clip_fraction} (detached)."""
    if kind not in GRPO_LOSSES:
        raise ValueError(f"unknown GRPO loss {kind!r}; choose one of {', '.join(GRPO_LOSSES)}")
    m = mask.to(logp.dtype)
    a = advantages.to(logp.dtype).unsqueeze(-1)                     # (N, 1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_token = -torch.minimum(ratio * a, clipped * a)
    if beta and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)
    tokens = m.sum().clamp(min=1.0)
    if kind == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif kind == "dapo":
        loss = (per_token * m).sum() / tokens
    else:
        if max_new_tokens is None:
            raise ValueError("dr_grpo normalises by max_new_tokens; pass it")
        loss = (per_token * m).sum() / (logp.shape[0] * max_new_tokens)
    with torch.no_grad():
        active = ((ratio < 1.0 - epsilon) & (a < 0)) | ((ratio > 1.0 + epsilon) & (a > 0))
        metrics = {"kl": (kl.detach() * m).sum() / tokens,
                   "clip_fraction": (active.to(m.dtype) * m).sum() / tokens}
    return loss, metrics


__all__ = ["GRPO_LOSSES", "group_advantages", "grpo_loss"]

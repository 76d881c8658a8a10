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

--grpo_iterations K (TRL's num_iterations): the rollouts of a batch are generated once and reused
for K optimizer steps; pi_old is the policy at generation time (the first update's log-probs), so
rho = 1 on the first update and the clip acts from the second on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .synced import Most

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


@dataclass(frozen=True)
class GRPOSettings:
    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    loss: str = "grpo"


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    length: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """prompt + completion per row, as next-token training rows padded with 0: x, y (N, T) int64 and
    mask (N, T) float32, 1 exactly where y is a completion token; T is the longest row, or `length`
    when that is more."""
    T = max([length] + [len(p) + len(c) - 1 for p, c in zip(prompts, completions)])
    N = len(completions)
    x = torch.zeros(N, T, dtype=torch.long)
    y = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor(list(p) + list(c), dtype=torch.long)
        n = ids.numel() - 1
        x[i, :n], y[i, :n] = ids[:-1], ids[1:]
        mask[i, len(p) - 1:n] = 1.0
    return x, y, mask


@dataclass
class Rollouts:
    """One micro-batch of sampled completions as training rows (on the model's device), reused for
    --grpo_iterations updates. old_logp / ref_logp (N, T) are filled by the first update: the
    policy's log-probs at generation time (pi_old) and the reference's (constant)."""

    prompts: list[int]   # the prompt records they answer (a check that a reuse is the same batch)
    x: Tensor            # (N, T) int64, N = P * G rows: prompt + completion
    y: Tensor            # (N, T) int64
    mask: Tensor         # (N, T) float32, 1 = completion token
    advantages: Tensor   # (N,)
    rewards: Tensor      # (P, G)
    mean_length: float   # completion tokens per row
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None


def sample_rollouts(model, prompts: Sequence[Sequence[int]], reward: Callable[[int, list[int]], float],
                    s: GRPOSettings, generator: torch.Generator, vocab_limit: int | None = None,
                    records: Sequence[int] = (), most: Most | None = None) -> Rollouts:
    """G rollouts per prompt with the shared batched decoder, rewards reward(prompt index,
    completion tokens) and group advantages. Under ZeRO-3, `most` (objectives.synced.most_over_processes)
    makes every process call the model as often: the synced sampler, and rows padded to the longest."""
    from ...decode import sample_batch
    from .synced import sample_batch_synced

    G = s.num_generations
    opts = dict(temperature=s.temperature, top_p=s.top_p, generator=generator, vocab_limit=vocab_limit)
    if most is None:
        groups = sample_batch(model, prompts, G, s.max_new_tokens, **opts)
    else:
        groups = sample_batch_synced(model, prompts, G, s.max_new_tokens, most=most, **opts)
    rewards = torch.tensor([[float(reward(i, r.tokens)) for r in group] for i, group in enumerate(groups)])
    adv = group_advantages(rewards, scale=s.loss != "dr_grpo").flatten()               # (P * G,)
    rows_p = [p for p in prompts for _ in range(G)]
    rows_c = [r.tokens for group in groups for r in group]
    device = model.emb.weight.device
    longest = max(len(p) + len(c) - 1 for p, c in zip(rows_p, rows_c))
    x, y, mask = (t.to(device) for t in completion_rows(rows_p, rows_c, most(longest) if most else 0))
    return Rollouts(list(records), x, y, mask, adv.to(device), rewards,
                    float(sum(len(c) for c in rows_c)) / len(rows_c))


def rollout_loss(model, reference, ro: Rollouts, s: GRPOSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped loss of one policy update on `ro`. The first update records pi_old = pi (so
    rho = 1 numerically: one update per batch is plain -A grad log pi); later ones compare with it."""
    from .logps import token_logps

    logp = token_logps(model, ro.x, ro.y, s.temperature)                              # (N, T)
    if ro.old_logp is None:
        ro.old_logp = logp.detach()
    if s.beta and reference is not None and ro.ref_logp is None:
        with torch.no_grad(), reference.swapped_in(model):
            ro.ref_logp = token_logps(model, ro.x, ro.y, s.temperature)
    loss, m = grpo_loss(logp, ro.old_logp, ro.advantages, ro.mask, ref_logp=ro.ref_logp, beta=s.beta,
                        epsilon=s.epsilon, kind=s.loss, max_new_tokens=s.max_new_tokens)
    m.update(reward_mean=ro.rewards.mean(), reward_std=ro.rewards.flatten().std(),
             completion_tokens=torch.tensor(ro.mean_length))
    return loss, m


def grpo_batch_loss(model, reference, prompts: Sequence[Sequence[int]],
                    reward: Callable[[int, list[int]], float], s: GRPOSettings,
                    generator: torch.Generator, vocab_limit: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One GRPO micro-batch with one policy update per batch of rollouts: sample, score, update."""
    return rollout_loss(model, reference, sample_rollouts(model, prompts, reward, s, generator, vocab_limit), s)


__all__ = ["GRPO_LOSSES", "GRPOSettings", "Rollouts", "group_advantages", "grpo_loss", "completion_rows",
           "sample_rollouts", "rollout_loss", "grpo_batch_loss"]

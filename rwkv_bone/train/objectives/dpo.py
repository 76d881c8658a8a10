"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023).

For a pair (x, y_w chosen, y_l rejected), with log pi(y|x) = sum over response tokens of
log-softmax(logits)[token]:

    delta = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    sigmoid:  L = -log sigmoid(beta * delta)          (delta = 0 at step 0, so L = ln 2)
    ipo:      L = (delta' - 1 / (2 beta))^2,           delta' from per-token *average* log-probs

Reported as HF TRL reports them (means over the pairs of a batch):
    rewards_chosen   = beta (log pi(y_w|x) - log ref(y_w|x))
    rewards_rejected = beta (log pi(y_l|x) - log ref(y_l|x))
    rewards_accuracy = share of pairs with rewards_chosen > rewards_rejected
    rewards_margin   = rewards_chosen - rewards_rejected
(with the log-probs the loss used: sums for sigmoid, per-token averages for ipo).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class SeqLogp:
    """Per-sequence log-probability of the response: `total` (B,) summed over the response tokens and
    `count` (B,) of those tokens."""

    total: Tensor
    count: Tensor

    def mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


def sequence_logps(logits: Tensor, targets: Tensor, mask: Tensor) -> SeqLogp:
    """logits (B, T, V) any float dtype, targets (B, T) int64, mask (B, T) (1 = response token)
    -> SeqLogp in float32 (float64 logits stay float64)."""
    z = logits.float() if logits.dtype != torch.float64 else logits
    token = torch.gather(F.log_softmax(z, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    m = mask.to(token.dtype)
    return SeqLogp((token * m).sum(-1), m.sum(-1))


def dpo_loss(policy_chosen: SeqLogp, policy_rejected: SeqLogp, ref_chosen: SeqLogp,
             ref_rejected: SeqLogp, beta: float, kind: str = "sigmoid") -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the pairs and the TRL metrics (detached scalars)."""
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; choose one of {', '.join(DPO_LOSSES)}")
    if kind == "ipo":
        pc, pr, rc, rr = (s.mean() for s in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    else:
        pc, pr, rc, rr = (s.total for s in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen, rejected = pc - rc, pr - rr                    # (B,) log-ratios
    delta = chosen - rejected
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * delta).mean()
    else:
        loss = ((delta - 1.0 / (2.0 * beta)) ** 2).mean()
    rw_c, rw_r = (beta * chosen).detach(), (beta * rejected).detach()
    metrics = {
        "rewards_chosen": rw_c.mean(),
        "rewards_rejected": rw_r.mean(),
        "rewards_accuracy": (rw_c > rw_r).to(rw_c.dtype).mean(),
        "rewards_margin": (rw_c - rw_r).mean(),
    }
    return loss, metrics


def pair_logps(model, x: Tensor, y: Tensor, mask: Tensor) -> tuple[SeqLogp, SeqLogp]:
    """x, y, mask (B, 2, T) (row 0 chosen, row 1 rejected, as --data_type pairs yields them) ->
    (chosen, rejected) SeqLogp (B,) each; both run in one (2B, T) forward."""
    from .logps import token_logps

    B, _, T = x.shape
    tok = token_logps(model, x.reshape(2 * B, T), y.reshape(2 * B, T)).reshape(B, 2, T)
    m = mask.to(tok.dtype)
    total, count = (tok * m).sum(-1), m.sum(-1)          # (B, 2)
    return SeqLogp(total[:, 0], count[:, 0]), SeqLogp(total[:, 1], count[:, 1])


def dpo_batch_loss(model, reference, x: Tensor, y: Tensor, mask: Tensor, beta: float,
                   kind: str = "sigmoid") -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO loss of one micro-batch of pairs; `reference` (objectives.reference.InitialWeights)
    gives the reference log-probs with the trained tensors at their start, without gradients, or is
    the (chosen, rejected) SeqLogp pair already known (objectives.stored: --peft none)."""
    if isinstance(reference, tuple):
        ref_c, ref_r = reference
    else:
        with torch.no_grad(), reference.swapped_in(model):
            ref_c, ref_r = pair_logps(model, x, y, mask)
    pol_c, pol_r = pair_logps(model, x, y, mask)
    return dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, kind)


__all__ = ["DPO_LOSSES", "SeqLogp", "sequence_logps", "dpo_loss", "pair_logps", "dpo_batch_loss"]

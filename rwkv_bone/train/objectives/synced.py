"""GRPO rollouts under DeepSpeed ZeRO-3, where each process holds only a slice of every weight and a
module's forward gathers its weights whole first (a collective, so every process must make the same
module calls in the same order).

decode.sample_batch does not fit that: RWKV6.step reads weights as tensors, outside their modules'
forward (under ZeRO-3 those are empty slices), and a process stops calling the model as soon as its
own rows end. Here instead:

  * every new token goes through the modules: forward_with_state on the (R, 1) tokens with the
    carried state, the arithmetic RWKV6.step does (the tests compare the two samplers token for
    token and log-prob for log-prob);
  * every process makes as many model calls as the busiest one (HF generate's synced_gpus): the
    prompt prefill is topped up with one-token idle calls to the largest count, and decoding goes
    on, idling where a process's rows have all ended, until no process has a row left;
  * the training rows are padded to the longest over the processes (sample_rollouts), so the
    chunked log-prob pass calls the head as often on each. Padding is masked out: the loss is
    unchanged.

`most(n)` is the largest n over the processes: most_over_processes under torch.distributed, the
identity on one process.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...decode import EOD_ID, PROMPT_CHUNK, Rollout, cat_states, feed, keep_rows, sample_rows
from ...model import LayerState

Most = Callable[[int], int]


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has sliced the model's weights (it tags them with ds_id)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def most_over_processes(n: int, device: torch.device) -> int:
    """The largest `n` over the processes of the default group (collective: every process calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def forward_step(model, tokens: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
    """RWKV6.step through the modules' forward: tokens (R,) -> logits (R, V) float32, new state."""
    logits, state = model.forward_with_state(tokens[:, None], state)
    return logits[:, 0], state


def idle_call(model) -> None:
    """One model call whose result is dropped: what a process with nothing left to decode runs
    while a busier one still needs the collective weight gathers."""
    model.forward_with_state(torch.zeros(1, 1, dtype=torch.long, device=model.emb.weight.device), None)


@torch.no_grad()  # not inference mode: weights gathered here outlive the call and later meet autograd
def sample_batch_synced(model, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, *,
                        temperature: float = 1.0, top_p: float = 1.0,
                        generator: Optional[torch.Generator] = None, vocab_limit: Optional[int] = None,
                        most: Most = lambda k: k) -> list[list[Rollout]]:
    """decode.sample_batch's rollouts (same draws from `generator`, same order) with every weight read
    inside its module's forward and, through `most`, as many model calls as the busiest process."""
    V = model.config.vocab_size
    device = model.emb.weight.device
    out = [[Rollout() for _ in range(n)] for _ in prompts]
    first, states, calls = [], [], 0
    for p in prompts:
        lg, st = feed(model, p, chunk=PROMPT_CHUNK)
        calls += -(-len(p) // PROMPT_CHUNK)   # feed's forward calls: one per chunk
        first.append(lg[None].expand(n, -1))
        states.append(cat_states([st] * n))
    for _ in range(most(calls) - calls):
        idle_call(model)
    logits = torch.cat(first, dim=0)                   # (P * n, V)
    state: Optional[list[LayerState]] = cat_states(states)
    active = [(i, j) for i in range(len(prompts)) for j in range(n)]
    tokens = torch.zeros(0, dtype=torch.long)
    while True:
        if active:
            if vocab_limit is not None and vocab_limit < V:
                logits = logits.clone()
                logits[:, vocab_limit:] = float("-inf")
            tokens, logps = sample_rows(logits, temperature, top_p, generator)
            keep = []
            for row, ((i, j), t, lp) in enumerate(zip(active, tokens.tolist(), logps.tolist())):
                r = out[i][j]
                r.tokens.append(t)
                r.logps.append(lp)
                if t == EOD_ID:
                    r.stopped = "eod"
                elif len(r.tokens) < max_tokens:
                    keep.append(row)
            tokens = tokens.to(device)
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                active = [active[r] for r in keep]
                tokens = tokens.index_select(0, rows)
                state = keep_rows(state, rows) if keep else None
        if not most(len(active)):                      # no process has a row left
            return out
        if active:
            logits, state = forward_step(model, tokens, state)
        else:
            idle_call(model)


__all__ = ["Most", "is_partitioned", "most_over_processes", "forward_step", "idle_call", "sample_batch_synced"]

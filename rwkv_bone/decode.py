"""Recurrent decoding shared by generate.py and eval.py: prompt prefill, one-token steps, and
batched greedy decoding.

An RWKV state is a fixed-size tensor per layer, so prompts of different lengths need no padding:

    for each prompt p:  logits_p, state_p = feed(model, p)      # once, in chunks, batch 1
    rows = stack(state_p ...)                                   # (B, ...) per layer
    repeat: t = argmax(logits) per row; finished rows leave the batch (their state rows are
            dropped), waiting prompts join it; logits, rows = model.step(t, rows)

A row never sees another row's numbers, so each completion equals the one decoded alone (the
tests check this token for token); a finished row costs nothing afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .errors import UserError
from .model import RWKV6, LayerState

EOD_ID = 0            # end of document: decoding always stops here
PROMPT_CHUNK = 256    # prompt tokens per forward: bounds the (T, V) logits held at once


def feed(model: RWKV6, ids: Sequence[int], state: Optional[list[LayerState]] = None,
         chunk: int = PROMPT_CHUNK) -> tuple[Tensor, list[LayerState]]:
    """Run `ids` through the model after `state`; returns the logits (V,) at the last token and the
    state after it. Pieces of `chunk` tokens give the same result as one pass (the state carries)."""
    if len(ids) == 0:
        raise UserError("nothing to feed the model; pass at least one token")
    device = model.emb.weight.device
    logits = None
    for start in range(0, len(ids), chunk):
        idx = torch.tensor([list(ids[start:start + chunk])], dtype=torch.long, device=device)  # (1, t)
        out, state = model.forward_with_state(idx, state)  # (1, t, V)
        logits = out[0, -1]
    return logits, state


def advance(model: RWKV6, token: int, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
    """One token after `state` (batch 1) through the one-token path: logits (V,), new state."""
    idx = torch.tensor([int(token)], dtype=torch.long, device=model.emb.weight.device)
    logits, state = model.step(idx, state)
    return logits[0], state


def cat_states(states: Sequence[list[LayerState]]) -> list[LayerState]:
    """Per-layer concatenation along the batch dimension of several states."""
    return [tuple(torch.cat(parts, dim=0) for parts in zip(*layers)) for layers in zip(*states)]


def keep_rows(state: list[LayerState], rows: Tensor) -> list[LayerState]:
    """The state of the batch rows `rows` (1-D int64 index), in that order."""
    return [tuple(t.index_select(0, rows) for t in layer) for layer in state]


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # new tokens, without the stop token
    stopped: str = "length"                          # "eod", "stop" (a stop rule) or "length"


StopRule = Callable[[int, list[int]], bool]  # (prompt index, tokens so far) -> stop now?


@torch.inference_mode()
def greedy_batch(model: RWKV6, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 batch_size: int = 16, stop: Optional[StopRule] = None,
                 vocab_limit: Optional[int] = None,
                 on_step: Optional[Callable[[int, int], None]] = None) -> list[Completion]:
    """Greedy completions of every prompt, in order. Up to `batch_size` prompts decode together;
    a row ends at token 0 (not kept), when `stop(i, tokens)` says so after a token (kept; the
    caller trims text it does not want), or after `max_tokens` tokens. Ids >= `vocab_limit` are
    never chosen. `on_step(produced, finished)` hears after every step how many tokens it made and
how many rows it ended (progress bars)."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    if max_tokens < 0:
        raise UserError(f"max_tokens {max_tokens} is negative; ask for 0 or more new tokens")
    V = model.config.vocab_size
    for p in prompts:
        if len(p) == 0:
            raise UserError("a prompt is empty; give the model some text to continue")
        bad = [t for t in p if not 0 <= int(t) < V]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{V - 1}); "
                            "use the tokenizer the model was trained with")
    out = [Completion() for _ in prompts]
    if max_tokens == 0:
        return out
    device = model.emb.weight.device
    waiting = list(range(len(prompts)))[::-1]  # pop() takes the next prompt in order
    active: list[int] = []                     # prompt index of each batch row
    logits: Optional[Tensor] = None            # (rows, V)
    state: Optional[list[LayerState]] = None
    while waiting or active:
        # Fill free rows: each new prompt is prefilled alone and its state joins the batch.
        joined_logits, joined_states = [], []
        while waiting and len(active) < batch_size:  # active already counts the rows joining now
            i = waiting.pop()
            lg, st = feed(model, prompts[i])
            joined_logits.append(lg[None])
            joined_states.append(st)
            active.append(i)
        if joined_states:
            logits = torch.cat(([logits] if logits is not None else []) + joined_logits, dim=0)
            state = cat_states(([state] if state is not None else []) + joined_states)
        assert logits is not None and state is not None
        if vocab_limit is not None and vocab_limit < V:
            logits[:, vocab_limit:] = float("-inf")
        tokens = torch.argmax(logits, dim=-1)  # (rows,)
        keep: list[int] = []
        produced = 0
        for row, (i, t) in enumerate(zip(active, tokens.tolist())):
            c = out[i]
            if t == EOD_ID:
                c.stopped = "eod"
                continue
            c.tokens.append(t)
            produced += 1
            if stop is not None and stop(i, c.tokens):
                c.stopped = "stop"
            elif len(c.tokens) < max_tokens:
                keep.append(row)
        if on_step is not None:
            on_step(produced, len(active) - len(keep))
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            active = [active[r] for r in keep]
            tokens = tokens.index_select(0, rows)
            state = keep_rows(state, rows) if keep else None
            logits = None
        if not active:
            state = logits = None
            continue
        logits, state = model.step(tokens, state)
    return out


@dataclass
class Rollout:
    """One sampled completion: its tokens (the end-of-document token 0 included when it ended
    there) and the log-probability of each under the sampled distribution softmax(logits / T)."""

    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    stopped: str = "length"                          # "eod" or "length"


def sample_rows(logits: Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """One token per row of logits (R, V), on the CPU in float32 (a seed gives the same draws on every
    device): (tokens (R,), their log-probs under softmax(logits / T) (R,)). top_p keeps the smallest
    set of most likely tokens whose mass reaches top_p, renormalised."""
    z = logits.detach().float().cpu() / temperature
    logp = torch.log_softmax(z, dim=-1)                                  # (R, V)
    probs = logp.exp()
    if top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens = draw(probs, generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One index per row of probs (R, V) >= 0 (rows need not be normalised), by inverse CDF: the first
    i with cumsum(p)[i] > u * sum(p), u ~ U[0, 1) in float64. A zero-probability index is never drawn
    (its cumsum equals its predecessor's). 30x faster than torch.multinomial at V = 65536."""
    c = torch.cumsum(probs.double(), dim=-1)                             # (R, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * c[:, -1:]
    idx = torch.searchsorted(c, u, right=True).squeeze(-1)               # (R,)
    over = idx >= probs.shape[-1]      # u rounded up to the total: take the last index with mass
    if bool(over.any()):
        last = probs.shape[-1] - 1 - (probs[over].flip(-1) > 0).to(torch.int8).argmax(-1)
        idx[over] = last
    return idx


@torch.inference_mode()
def sample_batch(model: RWKV6, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, *,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None,
                 vocab_limit: Optional[int] = None) -> list[list[Rollout]]:
    """`n` sampled completions of every prompt (GRPO rollouts): each prompt is prefilled once and its
    state repeated n times, then all rows decode together; a row ends after sampling token 0 (kept,
    it is trained on) or after `max_tokens` tokens. Returns out[prompt][j]."""
    if n < 1 or max_tokens < 1:
        raise UserError(f"need at least one completion and one new token (got {n} and {max_tokens})")
    if temperature <= 0:
        raise UserError(f"temperature {temperature} must be positive for sampling")
    V = model.config.vocab_size
    out = [[Rollout() for _ in range(n)] for _ in prompts]
    first, states = [], []
    for p in prompts:
        if len(p) == 0:
            raise UserError("a prompt is empty; give the model some text to continue")
        lg, st = feed(model, p)
        first.append(lg[None].expand(n, -1))
        states.append(cat_states([st] * n))
    logits = torch.cat(first, dim=0)                   # (P * n, V)
    state = cat_states(states)
    active = [(i, j) for i in range(len(prompts)) for j in range(n)]
    device = model.emb.weight.device
    while active:
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
        if not keep:
            break
        tokens = tokens.to(device)
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            active = [active[r] for r in keep]
            tokens = tokens.index_select(0, rows)
            state = keep_rows(state, rows)
        logits, state = model.step(tokens, state)
    return out


__all__ = ["EOD_ID", "PROMPT_CHUNK", "feed", "advance", "cat_states", "keep_rows", "Completion",
           "greedy_batch", "Rollout", "sample_rows", "sample_batch"]

"""The one-token step against forward_with_state, and batched greedy decoding against batch size 1."""
from __future__ import annotations

import pytest
import torch

from conftest import random_model
from rwkv_bone.decode import cat_states, feed, greedy_batch, keep_rows
from rwkv_bone.errors import UserError
from rwkv_bone.generate import generate_tokens
from rwkv_bone.peft import apply_peft


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_step_equals_forward_with_state(dtype, tol):
    model = random_model(1, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 300, (3, 5), generator=g)
    ids = torch.randint(0, 300, (3, 6), generator=g)
    with torch.no_grad():
        _, state = model.forward_with_state(prefix, None)  # a non-trivial starting state
        want, want_state = model.forward_with_state(ids, state)
        got, st = [], state
        for t in range(ids.shape[1]):
            logits, st = model.step(ids[:, t], st)
            got.append(logits)
    got = torch.stack(got, 1)
    assert got.dtype == want.dtype
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    for got_layer, want_layer in zip(st, want_state):  # att shift, wkv state, ffn shift
        for a, b in zip(got_layer, want_layer):
            assert a.dtype == b.dtype and (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def test_step_works_with_unmerged_adapters():
    """train.py's validation decodes with the adapters still attached."""
    model = random_model(2).eval()
    apply_peft(model, "bone", bone_b=64)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        ids = torch.randint(0, 300, (2, 4))
        want, _ = model.forward_with_state(ids, None)
        st = model.zero_state(2)
        for t in range(4):
            got, st = model.step(ids[:, t], st)
    assert torch.allclose(got, want[:, -1], atol=2e-5)


def test_state_rows_gather_and_select():
    model = random_model(0).eval()
    with torch.no_grad():
        _, s1 = feed(model, [1, 2, 3])
        _, s2 = feed(model, [4, 5])
    both = cat_states([s1, s2])
    back = keep_rows(both, torch.tensor([1]))
    for a, b in zip(back, s2):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


PROMPTS = [[5, 17, 99], [250, 42, 7, 1, 9, 33, 2], [8], [120, 121, 122, 123], [60, 61], [3, 4, 5, 6, 7]]


def _alone(model, prompts, n, **kw):
    return [greedy_batch(model, [p], n, batch_size=1, **kw)[0] for p in prompts]


@pytest.mark.parametrize("batch_size", [2, 16])
def test_batched_greedy_equals_batch_size_one(batch_size):
    model = random_model(3).eval()
    alone = _alone(model, PROMPTS, 8)
    batched = greedy_batch(model, PROMPTS, 8, batch_size=batch_size)
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert all(len(c.tokens) == 8 and c.stopped == "length" for c in batched)


def test_batch_one_equals_the_generate_path():
    model = random_model(4).eval()
    for p in PROMPTS[:3]:
        want = list(generate_tokens(model, p, 10, temperature=0, stop_ids=(0,)))
        assert greedy_batch(model, [p], 10)[0].tokens == want


def test_finished_rows_leave_the_batch_without_changing_the_others():
    """A stop rule ends some rows early (different lengths); the rest still match batch size 1."""
    model = random_model(5).eval()
    stop = lambda i, toks: len(toks) >= 2 + i  # noqa: E731 - row i stops after i + 2 tokens
    seen_rows = []
    batched = greedy_batch(model, PROMPTS, 9, batch_size=3, stop=stop,
                           on_step=lambda made, done: seen_rows.append(made))
    full = _alone(model, PROMPTS, 9)
    for i, c in enumerate(batched):
        assert c.stopped == "stop" and c.tokens == full[i].tokens[:2 + i]
    assert max(seen_rows) <= 3 and sum(seen_rows) == sum(len(c.tokens) for c in batched)


def test_the_batch_fills_every_free_row_at_once():
    """8 prompts at batch size 8 decode as one batch of 8 from the first step; 7 prompts at batch
    size 3 run 3 rows until too few prompts are left (a row that ends is refilled in the same step)."""
    model = random_model(5).eval()
    prompts = PROMPTS + [[11, 12], [13]]
    seen = []
    greedy_batch(model, prompts, 4, batch_size=8, on_step=lambda made, done: seen.append(made))
    assert seen == [8, 8, 8, 8]
    seen = []
    stop = lambda i, toks: len(toks) >= 2  # noqa: E731 - every row ends after 2 tokens
    greedy_batch(model, prompts[:7], 9, batch_size=3, stop=stop, on_step=lambda made, done: seen.append(made))
    assert seen == [3, 3, 3, 3, 1, 1]


def test_end_of_document_and_vocab_limit():
    model = random_model(6).eval()
    with torch.no_grad():
        model.ln_out.weight.zero_()  # the head sees a constant vector of ones ...
        model.ln_out.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[0] = 1.0   # ... so token 0 always wins: every row ends at once
    out = greedy_batch(model, PROMPTS[:3], 5, batch_size=2)
    assert all(c.tokens == [] and c.stopped == "eod" for c in out)
    model = random_model(6).eval()
    out = greedy_batch(model, PROMPTS, 8, batch_size=4, vocab_limit=50)
    assert all(0 < t < 50 for c in out for t in c.tokens)


def test_bad_decoding_requests_are_user_errors():
    model = random_model(0).eval()
    with pytest.raises(UserError, match="empty"):
        greedy_batch(model, [[1], []], 3)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        greedy_batch(model, [[1, 300]], 3)
    with pytest.raises(UserError, match="at least 1"):
        greedy_batch(model, [[1]], 3, batch_size=0)
    assert greedy_batch(model, [[1]], 0)[0].tokens == []

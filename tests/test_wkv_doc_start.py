"""WKV6 with document starts (packed samples): each document equals running it alone."""
from __future__ import annotations

import pytest
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.wkv import wkv6, wkv6_chunked, wkv6_reference, wkv6_with_doc_starts
from rwkv_bone.wkv.resets import RESET_W

from test_wkv import NAMES, assert_close_all, make_inputs


def starts_mask(B, T, starts_per_row):
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, starts in enumerate(starts_per_row):
        m[b, list(starts)] = True
    return m


def alone(inputs, doc_start, seed=1):
    """Ground truth: every document through the reference op on its own (state zero at its start,
    the row's initial state for a leading unmarked part), with the same output/state cotangents."""
    r, k, v, w, u, s = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u, s)]
    r, k, v, w, u, s = leaves
    B, T, H, N = r.shape
    ys, finals = [], []
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if doc_start[b, t]] + [T]
        state = None if doc_start[b, 0] else s[b:b + 1]
        parts = []
        for a, e in zip(cuts[:-1], cuts[1:]):
            y, state = wkv6_reference(r[b:b + 1, a:e], k[b:b + 1, a:e], v[b:b + 1, a:e], w[b:b + 1, a:e], u,
                                      state)
            parts.append(y)
            state = None if e < T else state
        ys.append(torch.cat(parts, 1))
        finals.append(state)
    y, S = torch.cat(ys), torch.cat(finals)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    ((y * gy).sum() + (S * gs).sum()).backward()
    return [y, S] + [x.grad for x in leaves]


def packed(fn, inputs, doc_start, seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, S = fn(*leaves, doc_start=doc_start)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    ((y * gy).sum() + (S * gs).sum()).backward()
    return [y, S] + [x.grad for x in leaves]


# Rows: a leading unmarked part continuing the initial state; starts off the chunk grid; a
# document of one token; starts on the grid; a single document.
STARTS = [(5, 6, 40, 41, 77), (0, 31, 32, 64, 90), (0,), (0, 1, 2, 3, 50)]


def reference_with_starts(r, k, v, w, u, s, doc_start):
    return wkv6_with_doc_starts(wkv6_reference, r, k, v, w, u, s, doc_start)


@pytest.mark.parametrize("fn", [wkv6, lambda *a, **kw: wkv6_chunked(*a, chunk=8, **kw), reference_with_starts],
                         ids=["chunked", "chunked-L8", "zero-decay-trick-on-reference"])
def test_each_document_equals_running_it_alone_float64(fn):
    inputs = make_inputs(4, 100, 2, 8, seed=3)
    ds = starts_mask(4, 100, STARTS)
    assert_close_all(packed(fn, inputs, ds), alone(inputs, ds), 1e-10)


def test_strong_decays_and_short_sequences_with_starts():
    inputs = make_inputs(2, 9, 1, 4, seed=4, w_range=(0.5, 2.5))  # every channel strong
    ds = starts_mask(2, 9, [(0, 4), (2, 3, 8)])
    assert_close_all(packed(wkv6, inputs, ds), alone(inputs, ds), 1e-10)
    assert_close_all(packed(lambda *a, **kw: wkv6_chunked(*a, strong_limit=0.5, **kw), inputs, ds),
                     alone(inputs, ds), 1e-10)


def test_float32_packed_matches_alone():
    inputs = make_inputs(2, 70, 2, 16, dtype=torch.float32, seed=6)
    ds = starts_mask(2, 70, [(0, 33, 34), (10, 60)])
    want = alone([x.double() for x in inputs], ds)
    assert_close_all(packed(wkv6, inputs, ds), want, 2e-4)


def test_reset_decay_is_exactly_zero_and_finite():
    w = torch.tensor(RESET_W)
    for dt in (torch.float32, torch.float64):
        assert torch.isfinite(torch.exp(w.to(dt)))
        assert torch.exp(-torch.exp(w.to(dt))).item() == 0.0


def test_no_marks_equals_no_doc_start():
    inputs = make_inputs(2, 40, 2, 8, seed=7)
    ds = torch.zeros(2, 40, dtype=torch.bool)
    assert_close_all(packed(wkv6, inputs, ds), alone(inputs, ds), 1e-10, NAMES)


def test_bad_doc_start_is_a_user_error():
    r, k, v, w, u, s = make_inputs(1, 4, 1, 4)
    with pytest.raises(UserError, match="doc_start"):
        wkv6(r, k, v, w, u, s, doc_start=torch.zeros(1, 4))
    with pytest.raises(UserError, match="doc_start"):
        wkv6(r, k, v, w, u, s, doc_start=torch.zeros(1, 5, dtype=torch.bool))

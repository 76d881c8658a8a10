"""Packed documents (doc_start): each document's logits and gradients equal running it alone."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from rwkv_bone import model as model_mod
from rwkv_bone.errors import UserError
from rwkv_bone.wkv import wkv6_reference, wkv6_with_doc_starts

from conftest import random_model

# Two packed rows of T = 45: documents of lengths (20, 1, 24) and (33, 12).
LENGTHS = [(20, 1, 24), (33, 12)]
T = 45


def pack(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (len(lengths), T), generator=g)
    ds = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, lens in enumerate(lengths):
        ds[b, torch.tensor(lens).cumsum(0)[:-1]] = True
        ds[b, 0] = True
    return idx, ds


def docs(lengths):
    for b, lens in enumerate(lengths):
        a = 0
        for n in lens:
            yield b, a, a + n
            a += n


def packed_vs_alone(model, idx, ds, lengths):
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(*idx.shape, model.config.vocab_size, generator=g, dtype=torch.float64)
    model.zero_grad()
    logits = model(idx, doc_start=ds)
    (logits * cot).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.zeros_like(logits)
    for b, a, e in docs(lengths):
        out = model(idx[b:b + 1, a:e])
        (out * cot[b:b + 1, a:e]).sum().backward()
        alone[b, a:e] = out[0].detach()
    alone_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(logits.detach(), alone, rtol=1e-10, atol=1e-10)
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], alone_grads[n], rtol=1e-9, atol=1e-10, msg=n)


@functools.lru_cache(maxsize=None)
def _small(seed: int):
    return random_model(seed=seed, n_embd=64, dim_ffn=128, vocab_size=64).double()


def small_model(seed: int):
    """A float64 2-layer C = 64 model (built once per seed, copied)."""
    return copy.deepcopy(_small(seed))


def reference_op(r, k, v, w, u, state=None, doc_start=None):
    if doc_start is None:
        return wkv6_reference(r, k, v, w, u, state)
    return wkv6_with_doc_starts(wkv6_reference, r, k, v, w, u, state, doc_start)


@pytest.mark.parametrize("path", ["chunked", "reference-zero-decay", "grad_cp"])
def test_packed_documents_equal_each_alone_float64(path, monkeypatch):
    model = small_model(3).train()
    if path == "reference-zero-decay":
        monkeypatch.setattr(model_mod, "wkv6", reference_op)
    model.grad_cp = path == "grad_cp"
    idx, ds = pack(LENGTHS, model.config.vocab_size)
    packed_vs_alone(model, idx, ds, LENGTHS)


def test_packed_forward_with_state_drops_state_only_where_marked():
    model = small_model(3).eval()
    idx, _ = pack(LENGTHS, model.config.vocab_size, seed=2)
    _, state = model.forward_with_state(idx[:, :10])
    ds = torch.zeros_like(idx, dtype=torch.bool)
    ds[0, 0] = True  # row 0 restarts, row 1 continues from the state
    ds[1, 7] = True
    with torch.no_grad():
        logits, new_state = model.forward_with_state(idx, state, doc_start=ds)
        torch.testing.assert_close(logits[0], model(idx[:1])[0])
        cont, _ = model.forward_with_state(idx[1:, :7], [tuple(t[1:] for t in s) for s in state])
        torch.testing.assert_close(logits[1, :7], cont[0])
        tail, tail_state = model.forward_with_state(idx[1:, 7:])
        torch.testing.assert_close(logits[1, 7:], tail[0])
        for (a, w, f), (a2, w2, f2) in zip(new_state, tail_state):
            torch.testing.assert_close(w[1:], w2)
            torch.testing.assert_close(a[1:], a2)


def test_bad_doc_start_is_a_user_error():
    model = random_model(seed=0)
    idx = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(UserError, match="doc_start"):
        model(idx, doc_start=torch.ones(1, 5))

"""Chunked cross-entropy and L2Wrap against the plain path and an explicit computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_bone.train.loss import (L2WRAP_SCALE, chunked_token_loss, fused_token_loss, fused_head_loss,
                                  position_weights, token_loss)


def _problem(B=2, T=37, C=16, V=53, seed=0, masked=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(C, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g) * 0.5)
    h = torch.randn(B, T, C, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).to(dtype) if masked else None
    return head, h, y, mask


def _grads(loss, head, h):
    gh, gw = torch.autograd.grad(loss, [h, head.weight])
    return gh, gw


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("l2wrap", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # ragged chunks, one chunk, one token per chunk
def test_chunked_loss_equals_plain_values_and_gradients(masked, l2wrap, chunk):
    head, h, y, mask = _problem(masked=masked)
    plain = token_loss(head(h), y, mask, l2wrap=l2wrap)
    chunked = chunked_token_loss(head, h, y, mask, l2wrap=l2wrap, chunk_tokens=chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(chunked, head, h), _grads(plain, head, h)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_plain_loss_is_the_masked_mean_of_nll():
    head, h, y, mask = _problem()
    logits = head(h).double()
    nll = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    expected = (nll * mask).sum() / mask.sum()
    torch.testing.assert_close(token_loss(head(h), y, mask).double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(token_loss(head(h), y).double(), nll.mean(), rtol=1e-6, atol=0)


def test_l2wrap_adds_exactly_rwkv_gradient_on_the_largest_logit():
    head, h, y, mask = _problem(masked=True)
    logits = head(h).detach().requires_grad_()
    (g_wrapped,) = torch.autograd.grad(token_loss(logits, y, mask, l2wrap=True), [logits])
    (g_plain,) = torch.autograd.grad(token_loss(logits, y, mask, l2wrap=False), [logits])
    # The explicit L2Wrap term: max logit * 1e-4 / (B*T) at each position's argmax, nothing else.
    top, idx = logits.detach().max(-1, keepdim=True)
    expected = torch.zeros_like(logits).scatter_(-1, idx, top * (L2WRAP_SCALE / y.numel()))
    torch.testing.assert_close(g_wrapped - g_plain, expected, rtol=1e-5, atol=1e-9)
    assert (expected != 0).sum() == y.numel()
    # ... and the loss value itself is unchanged.
    assert token_loss(logits, y, mask, l2wrap=True).item() == token_loss(logits, y, mask).item()


def test_chunked_loss_under_bf16_autocast_matches_plain_path():
    head, h, y, mask = _problem(T=64, C=32, V=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_loss(head(h), y, mask)
        chunked = chunked_token_loss(head, h, y, mask, chunk_tokens=24)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    # bf16 matmuls: the chunked weight gradient sums per-chunk products in fp32, the plain one
    # in one bf16 product, so they agree to bf16 rounding (relative to the gradient's size).
    for a, b in zip(_grads(chunked, head, h), _grads(plain, head, h)):
        assert (a - b).norm() / b.norm() < 1e-2


def test_split_calls_with_whole_sample_weights_sum_to_the_whole_loss():
    """What infctx does: the sample's loss over time pieces, each with its slice of the weights."""
    from rwkv_bone.train.loss import position_weights

    head, h, y, mask = _problem(T=40)
    whole = chunked_token_loss(head, h, y, mask, l2wrap=True, chunk_tokens=9)
    w = position_weights(y, mask)
    parts = sum(chunked_token_loss(head, h[:, s:s + 16], y[:, s:s + 16], weights=w[:, s:s + 16],
                                   l2wrap=True, n_positions=y.numel(), chunk_tokens=9)
                for s in range(0, 40, 16))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(parts, head, h), _grads(whole, head, h)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_chunked_loss_without_grad_gives_the_same_value():
    head, h, y, mask = _problem()
    with torch.no_grad():
        assert torch.allclose(chunked_token_loss(head, h, y, mask, chunk_tokens=5),
                              token_loss(head(h), y, mask), rtol=1e-6)


def test_model_features_through_head_equal_the_logits():
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6

    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=2, n_embd=64, vocab_size=97))
    idx = torch.randint(0, 97, (2, 11))
    h, _ = model.forward_features(idx)
    torch.testing.assert_close(model.head(h), model(idx), rtol=0, atol=0)
    y = torch.randint(0, 97, (2, 11))
    loss = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(chunked_token_loss(model.head, h, y, chunk_tokens=4), loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("l2wrap", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # 7 and 16 do not divide B*T = 74
def test_fused_loss_with_a_frozen_head_equals_plain_in_float64(masked, l2wrap, chunk):
    head, h, y, mask = _problem(masked=masked, dtype=torch.float64)
    head.weight.requires_grad_(False)
    plain = token_loss(head(h), y, mask, l2wrap=l2wrap)
    fused = fused_token_loss(head.weight, h, y, mask, l2wrap=l2wrap, chunk_tokens=chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    (g_fused,) = torch.autograd.grad(fused, [h])
    (g_plain,) = torch.autograd.grad(plain, [h])
    assert g_fused.dtype == torch.float64
    # fp32 logits: the head's float64 matmul rounds a little differently per chunk, so fp32 level
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-8)
    chunked = chunked_token_loss(head, h, y, mask, l2wrap=l2wrap, chunk_tokens=chunk)
    (g_chunked,) = torch.autograd.grad(chunked, [h])
    torch.testing.assert_close(fused, chunked, rtol=0, atol=0)  # same chunks: the same fp32 logits
    torch.testing.assert_close(g_fused, g_chunked, rtol=1e-12, atol=1e-15)


def test_fused_loss_scales_its_gradient_by_the_incoming_one():
    head, h, y, mask = _problem()
    w = position_weights(y, mask)
    loss = fused_head_loss(h, head.weight.detach(), y, w, 0.0, 10)
    (g1,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (g3,) = torch.autograd.grad(3 * loss, [h])
    torch.testing.assert_close(g3, 3 * g1)


def test_fused_loss_under_bf16_autocast_matches_the_chunked_path():
    head, h, y, mask = _problem(T=64, C=32, V=101)
    head.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_token_loss(head, h, y, mask, l2wrap=True, chunk_tokens=24)
        fused = fused_token_loss(head.weight, h, y, mask, l2wrap=True, chunk_tokens=24)
    torch.testing.assert_close(fused, chunked, rtol=0, atol=0)
    (a,) = torch.autograd.grad(fused, [h])
    (b,) = torch.autograd.grad(chunked, [h])
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # bf16 head both ways: the same numbers


@pytest.mark.parametrize("masked, l2wrap", [(False, True), (True, False)])
def test_fused_training_step_gives_the_chunked_paths_adapter_gradients(masked, l2wrap):
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft

    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=2, n_embd=64, vocab_size=97)).double()
    apply_peft(model, "bone", bone_b=16, lora_r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    assert not model.head.weight.requires_grad
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 97, (2, 29), generator=g), torch.randint(0, 97, (2, 29), generator=g)
    mask = (torch.rand(2, 29, generator=g) > 0.3).float() if masked else None
    losses, grads = [], []
    for fused in (True, False):
        h, _ = model.forward_features(x)
        loss = (fused_token_loss(model.head.weight, h, y, mask, l2wrap=l2wrap, chunk_tokens=10) if fused
                else chunked_token_loss(model.head, h, y, mask, l2wrap=l2wrap, chunk_tokens=10))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

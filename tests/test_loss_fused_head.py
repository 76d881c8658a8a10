"""The fused cross-entropy with a TRAINED head (from-scratch pre-training, --train_parts head):
loss, dL/dh and dL/dW against the plain path, L2Wrap's unscaled term, .grad accumulation over
micro-batches, bf16 autocast, and the training step choosing it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from test_loss import _problem as loss_problem

from rwkv_bone.train.loss import (chunked_token_loss, fused_head_loss, fused_token_loss, position_weights,
                                  token_loss, uses_fused_loss)


def _problem(B=2, T=37, C=16, V=53, seed=0, masked=True, dtype=torch.float64):
    """test_loss's problem, in float64 unless told otherwise."""
    return loss_problem(B, T, C, V, seed, masked, dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("l2wrap", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # 7 and 16 do not divide B*T = 74
def test_fused_trained_head_loss_and_both_gradients_equal_plain_in_float64(masked, l2wrap, chunk):
    head, h, y, mask = _problem(masked=masked)
    plain = token_loss(head(h), y, mask, l2wrap=l2wrap)
    fused = fused_token_loss(head.weight, h, y, mask, l2wrap=l2wrap, chunk_tokens=chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    gh, gw = torch.autograd.grad(fused, [h, head.weight])
    ph, pw = torch.autograd.grad(plain, [h, head.weight])
    assert gh.dtype == gw.dtype == torch.float64 and gw.abs().sum() > 0
    # the plain path takes fp32 logits, so both agree to fp32 rounding
    torch.testing.assert_close(gh, ph, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gw, pw, rtol=1e-5, atol=1e-8)
    chunked = chunked_token_loss(head, h, y, mask, l2wrap=l2wrap, chunk_tokens=chunk)
    ch, cw = torch.autograd.grad(chunked, [h, head.weight])
    torch.testing.assert_close(fused, chunked, rtol=0, atol=0)  # same chunks: the same fp32 logits
    # g is bit for bit the chunked path's; dW sums per-chunk products in another order
    torch.testing.assert_close(gh, ch, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gw, cw, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("scale", [3.0, 0.5, 0.0])
@pytest.mark.parametrize("trained", [True, False])
def test_l2wrap_term_is_not_scaled_by_the_incoming_gradient_as_on_the_plain_path(scale, trained):
    """Lightning divides the loss by --accumulate_grad_batches: the cross-entropy gradient scales,
    RWKV's L2Wrap term does not (its backward returns it as is), on every path."""
    head, h, y, mask = _problem()
    head.weight.requires_grad_(trained)
    wrt = [h, head.weight] if trained else [h]
    fused = torch.autograd.grad(scale * fused_token_loss(head.weight, h, y, mask, l2wrap=True, chunk_tokens=10), wrt)
    plain = torch.autograd.grad(scale * token_loss(head(h), y, mask, l2wrap=True), wrt)
    without = torch.autograd.grad(scale * token_loss(head(h), y, mask), wrt)
    for a, b, c in zip(fused, plain, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
        assert (b - c).abs().max() > 1e-7  # the L2Wrap term is there, unscaled


def test_head_grad_accumulates_over_micro_batches_like_autograd():
    """Two micro-batches, each loss / 2 backward into .grad (as Lightning with
    --accumulate_grad_batches 2), starting from a non-zero .grad: fused == plain."""
    head, h, y, mask = _problem()
    batches = [(h.detach()[:1], y[:1], mask[:1]), (h.detach()[1:], y[1:], mask[1:])]
    grads = []
    for fused in (True, False):
        head.weight.grad = torch.full_like(head.weight, 0.25)
        for hb, yb, mb in batches:
            if fused:
                loss = fused_token_loss(head.weight, hb, yb, mb, l2wrap=True, chunk_tokens=8)
            else:
                loss = token_loss(head(hb), yb, mb, l2wrap=True)
            (loss / 2).backward()
        grads.append(head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)
    assert (grads[0] - 0.25).abs().sum() > 0


def test_fused_loss_without_grad_gives_the_value_and_keeps_nothing():
    head, h, y, mask = _problem()
    with torch.no_grad():
        loss = fused_token_loss(head.weight, h, y, mask, l2wrap=True, chunk_tokens=5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, token_loss(head(h), y, mask).detach(), rtol=1e-6, atol=1e-7)
    # only the weight trains (h without grad): dL/dW alone, as autograd would
    w = position_weights(y, mask)
    (gw,) = torch.autograd.grad(fused_head_loss(h.detach(), head.weight, y, w, 0.0, 9), [head.weight])
    (pw,) = torch.autograd.grad(token_loss(head(h.detach()), y, mask), [head.weight])
    torch.testing.assert_close(gw, pw, rtol=1e-5, atol=1e-8)


def test_fused_trained_head_under_bf16_autocast_matches_the_chunked_path():
    head, h, y, mask = _problem(T=64, C=32, V=101, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_token_loss(head, h, y, mask, l2wrap=True, chunk_tokens=24)
        fused = fused_token_loss(head.weight, h, y, mask, l2wrap=True, chunk_tokens=24)
        plain = token_loss(head(h), y, mask, l2wrap=True)
    torch.testing.assert_close(fused, chunked, rtol=0, atol=0)  # the same bf16 head products
    gh, gw = torch.autograd.grad(fused, [h, head.weight])
    ch, cw = torch.autograd.grad(chunked, [h, head.weight])
    _, pw = torch.autograd.grad(plain, [h, head.weight])
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gh, ch, rtol=0, atol=0)  # the same bf16 products
    # dW: per-chunk bf16 products summed in fp32 here, in bf16 by autograd on the chunked path
    # and one bf16 product on the plain one: equal to bf16 rounding
    for other in (cw, pw):
        assert (gw - other).norm() / other.norm() < 1e-2


def _trained_head_model():
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6

    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=2, n_embd=64, vocab_size=97)).double()
    with torch.no_grad():  # the reference init zeroes some linears; noise makes every gradient count
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def _module(model, chunked: bool, train_type: str = "normal"):
    from rwkv_bone.train import parse_args
    from rwkv_bone.train.config import TrainConfig
    from rwkv_bone.train.module import RWKVTrainModule

    cfg = TrainConfig.from_args(parse_args(["--load_model", "", "--n_layer", "2", "--n_embd", "64",
                                            "--peft", "none", "--dry_run"]))
    assert cfg.optim.l2wrap  # from-scratch training turns L2Wrap on
    optim = dataclasses.replace(cfg.optim, chunked_ce=chunked, train_type=train_type, chunk_ctx=8)
    return RWKVTrainModule(model, optim, cfg.data, seed=0, start_step=0, total_steps=1)


@pytest.mark.parametrize("masked", [False, True])
def test_training_step_with_a_trained_head_takes_the_fused_path_and_matches_plain(masked):
    model = _trained_head_model()
    assert model.head.weight.requires_grad and uses_fused_loss(model.head)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 97, (2, 29), generator=g), torch.randint(0, 97, (2, 29), generator=g)
    mask = (torch.rand(2, 29, generator=g) > 0.3).double() if masked else None
    fused = _module(model, chunked=True).batch_loss(x, y, mask)
    assert type(fused.grad_fn).__name__ == "_FusedHeadLossBackward"  # the head is applied once
    plain = _module(model, chunked=False).batch_loss(x, y, mask)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    want = torch.autograd.grad(plain, params)
    for a, b in zip(torch.autograd.grad(fused, params), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # infctx with a trained head: the same gradients, chunk by chunk
    inf = _module(model, chunked=True, train_type="infctx").batch_loss(x, y, mask)
    for a, b in zip(torch.autograd.grad(inf, params), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_zero3_partitioned_head_falls_back_to_the_chunked_module_path():
    model = _trained_head_model()
    model.head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert not uses_fused_loss(model.head)
    x = torch.randint(0, 97, (1, 9))
    loss = _module(model, chunked=True).batch_loss(x, x, None)
    assert type(loss.grad_fn).__name__ != "_FusedHeadLossBackward"


def test_full_training_with_accumulation_gives_the_plain_paths_weights(tmp_path):
    """train.py --peft none (every tensor trains, the head too, L2Wrap on) with
    --accumulate_grad_batches 2: Lightning divides each micro-batch's loss by 2 and sums the .grad;
    the fused path ends at the plain path's weights."""
    from rwkv_bone.train import parse_args, run

    from test_train_helpers import base_flags, pattern_data, tiny_checkpoint

    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pth"))
    data = pattern_data(str(tmp_path / "pattern"))
    trained = []
    for chunked in (1, 0):
        proj = str(tmp_path / f"ce{chunked}")
        flags = base_flags(ckpt, data, proj, peft="none", bone_b=None, epoch_steps=2, epoch_count=1,
                           accumulate_grad_batches=2, chunked_ce=chunked, lr_init=1e-3)
        args = parse_args(flags)
        assert args.l2wrap is True
        assert run(args) == 0
        trained.append(torch.load(f"{proj}/rwkv-0.pth", weights_only=True))
    base = torch.load(ckpt, weights_only=True)
    assert not torch.equal(trained[0]["head.weight"], base["head.weight"])  # the head trained
    assert trained[0].keys() == trained[1].keys()
    for k in trained[0]:
        if k in base:
            torch.testing.assert_close(trained[0][k], trained[1][k], rtol=1e-4, atol=1e-6)

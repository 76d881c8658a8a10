"""infctx (--train_type infctx): chunked state-carrying loss against the whole-sample loss and training."""
from __future__ import annotations

import os

import pytest
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.train import parse_args, run
from rwkv_bone.train.infctx import infctx_loss
from rwkv_bone.train.loss import chunked_token_loss

from test_train_helpers import base_flags, pattern_data, sft_data, tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("infctx")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern")), "dir": d}


def _bone_model(ckpt: str, method: str = "bone"):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft

    model = RWKV6.from_checkpoint(ckpt, dtype=torch.float64)
    torch.manual_seed(0)
    apply_peft(model, method, bone_b=16, lora_r=4)
    with torch.no_grad():  # a non-zero adapter, so its gradient goes through every path
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
                p.data = p.data.double()
    return model


# ragged last chunk; even split, with per-block checkpointing (--grad_cp 1) nested inside
@pytest.mark.parametrize("chunk, masked, grad_cp", [(7, True, False), (16, False, True)])
def test_infctx_loss_and_gradients_equal_the_whole_sample(files, chunk, masked, grad_cp):
    model = _bone_model(files["ckpt"])
    model.grad_cp = grad_cp
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 40), generator=g)
    y = torch.randint(0, 64, (2, 40), generator=g)
    mask = (torch.rand(2, 40, generator=g) > 0.3).double() if masked else None
    params = [p for p in model.parameters() if p.requires_grad]

    whole = chunked_token_loss(model.head, model.forward_features(x)[0], y, mask, l2wrap=True)
    g_whole = torch.autograd.grad(whole, params)
    part = infctx_loss(model, x, y, mask, chunk, l2wrap=True)
    g_part = torch.autograd.grad(part, params)
    torch.testing.assert_close(part, whole.float(), rtol=1e-6, atol=1e-7)
    for a, b in zip(g_part, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # float64: exact, not truncated


def test_infctx_gradient_reaches_back_through_the_carried_state(files):
    """The loss of the last chunk alone depends on the first chunk's tokens only through the state:
    its gradient with respect to an adapter used only there must be non-zero and exact."""
    model = _bone_model(files["ckpt"])
    x = torch.randint(0, 64, (1, 32))
    y = torch.randint(0, 64, (1, 32))
    mask = torch.zeros(1, 32, dtype=torch.float64)
    mask[:, -4:] = 1  # only the last chunk's tail is trained
    emb = model.emb.weight
    emb.requires_grad_(True)
    whole = chunked_token_loss(model.head, model.forward_features(x)[0], y, mask)
    (gw,) = torch.autograd.grad(whole, [emb])
    (gp,) = torch.autograd.grad(infctx_loss(model, x, y, mask, 8), [emb])
    first = x[0, :8].unique()
    assert gp[first].abs().sum() > 0
    torch.testing.assert_close(gp, gw, rtol=1e-9, atol=1e-12)


def _train(files, proj, data=None, **over):
    opts = dict(ctx_len=256, micro_bsz=2, epoch_steps=4, epoch_count=1, lr_init=3e-3)
    opts.update(over)
    flags = base_flags(files["ckpt"], data or files["data"], proj, **opts)
    assert run(parse_args(flags)) == 0
    sd = torch.load(os.path.join(proj, "rwkv-0.pth"), weights_only=True)
    sd.pop("__peft__")
    return sd


@pytest.mark.parametrize("method", [dict(peft="bone"), dict(peft="lora", lora_r=4, bone_b=None)])
def test_infctx_training_equals_plain_training(files, tmp_path, method):
    plain = _train(files, str(tmp_path / "plain"), **method)
    inf = _train(files, str(tmp_path / "inf"), train_type="infctx", chunk_ctx=64, **method)
    assert plain.keys() == inf.keys()
    for k in plain:
        assert plain[k].abs().sum() > 0
        torch.testing.assert_close(inf[k], plain[k], rtol=1e-4, atol=1e-5)


def test_infctx_with_the_sft_sampler_equals_plain_training(files, tmp_path):
    docs = [list(range(1, 40)) + [0], list(range(20, 50)) + [0]] * 3
    masks = [[0] * 10 + [1] * 30, [0] * 5 + [1] * 26] * 3
    data = sft_data(str(tmp_path / "sft"), docs, masks)
    over = dict(data_type="sft", ctx_len=48)
    plain = _train(files, str(tmp_path / "plain"), data, **over)
    inf = _train(files, str(tmp_path / "inf"), data, train_type="infctx", chunk_ctx=16, **over)
    for k in plain:
        torch.testing.assert_close(inf[k], plain[k], rtol=1e-4, atol=1e-5)


def test_bad_chunk_ctx_is_a_user_error(files):
    with pytest.raises(UserError, match="--chunk_ctx must be a positive integer"):
        parse_args(base_flags(files["ckpt"], files["data"], "x", train_type="infctx", chunk_ctx=0))

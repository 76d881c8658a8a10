"""MiSS (--peft miss): the layer against its explicit definition (float64, values and gradients),
counts, merging and files."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import random_model
from rwkv_bone.errors import UserError
from rwkv_bone.peft import (MissLinear, adapter_modules, apply_peft, count_trainable, load_adapter,
                            merge_peft, read_adapter_file, save_adapter)
from rwkv_bone.peft.adapter_io import merge_state_dict

ROOT = Path(__file__).resolve().parents[1]
D64 = torch.float64
IDX = torch.tensor([[1, 5, 17, 99, 3, 250, 42, 7]])


def explicit_weight(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W'[o, c*r + i] = W[o, c*r + i] + M~[i, o], element by element (the slow truth)."""
    out, n_in = w.shape
    r, width = m.shape
    w2 = w.clone()
    for o in range(out):
        for j in range(n_in):
            w2[o, j] = w[o, j] + m[j % r, o % width]
    return w2


@pytest.mark.parametrize("mode,r,mini_r,shape", [("default", 8, None, (24, 32)), ("default", 4, None, (16, 48)),
                                                 ("mini", 8, 6, (24, 32)), ("mini", 4, 16, (16, 48))])
def test_miss_matches_explicit_weight_values_and_gradients(mode, r, mini_r, shape):
    out, n_in = shape
    torch.manual_seed(0)
    base = nn.Linear(n_in, out, bias=False).to(D64)
    layer = MissLinear(base, r, mode, mini_r or 1).to(D64)
    with torch.no_grad():
        layer.miss.normal_(0, 0.3)
    x = torch.randn(3, 5, n_in, dtype=D64, requires_grad=True)
    y = layer(x)
    m = layer.miss.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    want = x2 @ explicit_weight(base.weight.detach(), m).t()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.miss.grad, m.grad, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None              # the base stays frozen
    torch.testing.assert_close(layer.delta_weight().to(D64) + base.weight,
                               explicit_weight(base.weight.detach(), m.detach()))


def test_miss_refuses_ranks_that_do_not_divide():
    with pytest.raises(UserError, match="MiSS rank 5 does not divide in_features=32"):
        MissLinear(nn.Linear(32, 16, bias=False), 5)
    with pytest.raises(UserError, match="--miss_mini_r 5 does not divide out_features=16"):
        MissLinear(nn.Linear(32, 16, bias=False), 8, "mini", 5)


def test_miss_count_equals_bone_b64_on_1_6b():
    assert count_trainable("1.6b", "miss", miss_r=64) == 33_030_144
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model_preset", "1.6b", "--peft", "miss",
                          "--miss_r", "64", "--dry_run"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "trainable parameters: 33,030,144" in out.stdout


def test_miss_mini_count(tiny_config):
    C, F, L = tiny_config.n_embd, tiny_config.dim_ffn, tiny_config.n_layer
    assert count_trainable(tiny_config, "miss", miss_r=16, miss_mode="mini", miss_mini_r=32) == 8 * L * 16 * 32
    assert count_trainable(tiny_config, "miss", miss_r=16) == L * 16 * (7 * C + F)


@pytest.mark.parametrize("options", [dict(miss_r=32), dict(miss_r=16, miss_mode="mini", miss_mini_r=32)])
def test_miss_merge_save_load_equal_the_adapted_model(tmp_path, options):
    model = random_model()
    base_sd = copy.deepcopy(model.state_dict())
    apply_peft(model, "miss", **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            layer.miss.copy_(torch.randn(layer.miss.shape, generator=g) * 0.05)
        want = model(IDX)
    save_adapter(model, tmp_path / "miss.pth")
    fresh = random_model()
    load_adapter(fresh, tmp_path / "miss.pth")
    merged = merge_state_dict(base_sd, read_adapter_file(tmp_path / "miss.pth"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), want, rtol=0, atol=0)
        assert (want - random_model()(IDX)).abs().max() > 1e-3
        merge_peft(model)
        torch.testing.assert_close(model(IDX), want, rtol=1e-5, atol=1e-5)
        other = random_model()
        other.load_state_dict(merged)
        torch.testing.assert_close(other(IDX), want, rtol=1e-5, atol=1e-5)

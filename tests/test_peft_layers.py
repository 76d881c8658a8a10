"""Adapter layers against the obvious explicit formulas, in float64, at non-zero adapter values."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rwkv_bone.errors import UserError
from rwkv_bone.peft import BoneLinear, LoraLinear, bone_delta

D64 = torch.float64


def explicit_weight(w: torch.Tensor, mode: str, bone: torch.Tensor, bone_b: torch.Tensor | None = None):
    """W' built block by block straight from the definition (the slow truth)."""
    b = bone.shape[-1]
    out, n_in = w.shape
    blocks = [[None] * (n_in // b) for _ in range(out // b)]
    for a in range(out // b):
        for c in range(n_in // b):
            wac = w[a * b:(a + 1) * b, c * b:(c + 1) * b]
            if mode == "row":
                blk = wac @ bone[c] + bone[c]
            elif mode == "col":
                blk = wac @ bone[a] + bone[a]
            else:
                blk = wac @ bone[c] + bone_b[c]
            blocks[a][c] = wac + blk
    return torch.cat([torch.cat(row, 1) for row in blocks], 0)


def make_linear(out: int, n_in: int, dtype=D64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, out, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, n_in ** -0.5)
    return lin


def randomize_adapter(layer: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.adapter_names():
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g) * std)


def cast_adapters(layer: nn.Module, dtype) -> None:
    for name in layer.adapter_names():
        getattr(layer, name).data = getattr(layer, name).data.to(dtype)


@pytest.mark.parametrize("mode", ["row", "col", "ab"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_bone_matches_explicit_weight_values_and_gradients(mode, shape):
    out, n_in = shape
    layer = BoneLinear(make_linear(out, n_in), b=32, mode=mode)
    cast_adapters(layer, D64)
    randomize_adapter(layer)
    layer.weight.requires_grad_(True)              # also check dL/dW through the adapter
    x = torch.randn(3, 5, n_in, dtype=D64, requires_grad=True)
    gy = torch.randn(3, 5, out, dtype=D64)

    params = [x, layer.weight] + [getattr(layer, n) for n in layer.adapter_names()]
    y = layer(x)
    fast = torch.autograd.grad(y, params, gy)
    args = [getattr(layer, n) for n in layer.adapter_names()]
    y_ref = x @ explicit_weight(layer.weight, mode, *args).t()
    ref = torch.autograd.grad(y_ref, params, gy)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mode", ["row", "col", "ab"])
def test_bone_delta_matches_block_definition(mode):
    w = torch.randn(96, 128, dtype=D64)
    n = (96 if mode == "col" else 128) // 32
    bone, bone_b = torch.randn(n, 32, 32, dtype=D64), torch.randn(n, 32, 32, dtype=D64)
    got = bone_delta(w, bone, mode, bone_b if mode == "ab" else None)
    want = explicit_weight(w, mode, bone, bone_b) - w
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["row", "col", "ab"])
def test_bone_accepts_non_contiguous_input(mode):
    layer = BoneLinear(make_linear(64, 32), b=16, mode=mode)
    cast_adapters(layer, D64)
    randomize_adapter(layer)
    xt = torch.randn(32, 9, dtype=D64)                 # x = xt^T is a transposed view
    args = [getattr(layer, n) for n in layer.adapter_names()]
    torch.testing.assert_close(layer(xt.t()), xt.t() @ explicit_weight(layer.weight, mode, *args).t())


def test_bone_gradients_without_input_grad_match_explicit():
    # First-layer inputs often need no gradient; the adapter gradient must not depend on it.
    layer = BoneLinear(make_linear(64, 64), b=16, mode="row")
    cast_adapters(layer, D64)
    randomize_adapter(layer)
    x = torch.randn(7, 64, dtype=D64)
    (g,) = torch.autograd.grad(layer(x).square().sum(), [layer.bone])
    (g_ref,) = torch.autograd.grad((x @ explicit_weight(layer.weight, "row", layer.bone).t()).square().sum(), [layer.bone])
    torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("make", [
    lambda base: BoneLinear(base, 32, "row"),
    lambda base: BoneLinear(base, 32, "col"),
    lambda base: BoneLinear(base, 32, "ab"),
    lambda base: LoraLinear(base, 8, 16),
], ids=["row", "col", "ab", "lora"])
def test_zero_initialised_adapter_equals_base_layer(make):
    base = make_linear(64, 96, torch.float32)
    x = torch.randn(4, 96)
    want = base(x)
    layer = make(base)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    assert all(getattr(layer, n).requires_grad for n in layer.adapter_names())


def test_wrapper_keeps_the_same_weight_parameter_and_key():
    base = make_linear(64, 64, torch.float32)
    layer = BoneLinear(base, 16, "row")
    assert layer.weight is base.weight
    assert set(layer.state_dict()) == {"weight", "bone"}
    assert set(LoraLinear(make_linear(64, 64, torch.float32), 4).state_dict()) == {"weight", "lora_A", "lora_B"}


@pytest.mark.parametrize("mode", ["row", "col", "ab"])
def test_bone_saves_no_weight_sized_activation(mode):
    out, n_in, n_tok = 256, 128, 8                  # weight far larger than the activations
    layer = BoneLinear(make_linear(out, n_in, torch.float32), 32, mode)
    randomize_adapter(layer)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(n_tok, n_in, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert sum(saved.values()) <= x.numel() * 4 + 64   # at most the input itself (+ tiny casts)
    y.sum().backward()
    assert layer.weight.grad is None


@pytest.mark.parametrize("mode", ["row", "col", "ab"])
def test_bone_bf16_close_to_float32(mode):
    base = make_linear(128, 128, torch.float32)
    layer32 = BoneLinear(base, 64, mode)
    randomize_adapter(layer32, std=0.02)
    x = torch.randn(16, 128)
    y32 = layer32(x)
    base16 = nn.Linear(128, 128, bias=False).to(torch.bfloat16)
    base16.weight.data.copy_(base.weight.data)
    layer16 = BoneLinear(base16, 64, mode)
    layer16.load_state_dict({k: v for k, v in layer32.state_dict().items() if k != "weight"}, strict=False)
    y16 = layer16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().sum().backward()
    assert all(getattr(layer16, n).grad.dtype == torch.float32 for n in layer16.adapter_names())


def test_bone_under_activation_checkpointing_gives_same_gradients():
    layer = BoneLinear(make_linear(64, 64, torch.float32), 16, "col")
    randomize_adapter(layer)
    x = torch.randn(5, 64, requires_grad=True)
    (g1,) = torch.autograd.grad(layer(x).square().sum(), [layer.bone])
    (g2,) = torch.autograd.grad(checkpoint(layer, x, use_reentrant=False).square().sum(), [layer.bone])
    torch.testing.assert_close(g1, g2)


def test_bad_block_size_names_layer_and_dimension():
    with pytest.raises(UserError, match=r"does not divide in_features=100 of layer blocks\.0\.att\.key"):
        BoneLinear(make_linear(64, 100), 64, "row", name="blocks.0.att.key")
    with pytest.raises(UserError, match=r"out_features=80"):
        BoneLinear(make_linear(80, 64), 64, "col", name="x")
    with pytest.raises(UserError, match="unknown Bone mode"):
        BoneLinear(make_linear(64, 64), 64, "diag")


def test_lora_matches_explicit_delta_with_nonzero_b():
    layer = LoraLinear(make_linear(48, 40), r=4, alpha=12)
    cast_adapters(layer, D64)
    randomize_adapter(layer, std=0.3)
    x = torch.randn(6, 40, dtype=D64, requires_grad=True)
    gy = torch.randn(6, 48, dtype=D64)
    params = [x, layer.lora_A, layer.lora_B]
    fast = torch.autograd.grad(layer(x), params, gy)
    w = layer.weight + 3.0 * layer.lora_B @ layer.lora_A
    ref = torch.autograd.grad(x @ w.t(), params, gy)
    torch.testing.assert_close(layer(x), x @ w.t())
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(layer.delta_weight().double(), w - layer.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_init_leave_output_unchanged(init):
    base = make_linear(96, 64, torch.float32)
    w0 = base.weight.detach().clone()
    x = torch.randn(10, 64)
    want = base(x).detach()
    layer = LoraLinear(base, r=8, init=init, niter=2)
    assert layer.weight is base.weight              # residual written into the same Parameter
    assert not torch.allclose(layer.weight, w0)     # ... which really holds W_res now
    assert layer.scale == 1.0
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight + layer.init_B @ layer.init_A, w0, rtol=1e-5, atol=1e-5)


def test_pissa_captures_top_singular_values():
    base = make_linear(64, 64, torch.float32)
    u, _, v = torch.linalg.svd(base.weight.detach())
    s = 0.7 ** torch.arange(64.0)                    # a decaying spectrum, like trained weights
    base.weight.data.copy_(u @ torch.diag(s) @ v)
    layer = LoraLinear(base, r=4, init="pissa", niter=8)
    got = torch.linalg.svdvals(layer.init_B @ layer.init_A)[:4]
    torch.testing.assert_close(got, s[:4], rtol=1e-3, atol=1e-3)


def test_merged_linear_equals_adapted_layer():
    for layer in (BoneLinear(make_linear(64, 96, torch.float32), 32, "row"),
                  BoneLinear(make_linear(64, 96, torch.float32), 32, "col"),
                  BoneLinear(make_linear(64, 96, torch.float32), 32, "ab"),
                  LoraLinear(make_linear(64, 96, torch.float32), 4, 8),
                  LoraLinear(make_linear(64, 96, torch.float32), 4, init="pissa")):
        randomize_adapter(layer)
        x = torch.randn(5, 96)
        want = layer(x).detach()
        lin = layer.merged_linear()
        assert type(lin) is nn.Linear and lin.weight is layer.weight
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_lora_rank_too_large_is_a_user_error():
    with pytest.raises(UserError, match="rank r=99 does not fit layer L"):
        LoraLinear(make_linear(64, 32), 99, name="L")


@pytest.mark.parametrize("mode", ["row", "col"])
def test_bone_under_bf16_autocast_matches_float32(mode):
    layer = BoneLinear(make_linear(128, 64, torch.float32), 32, mode)
    randomize_adapter(layer, std=0.02)
    x = torch.randn(12, 64, requires_grad=True)
    y32 = layer(x)
    (g32,) = torch.autograd.grad(y32.sum(), [layer.bone])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    (g16,) = torch.autograd.grad(y16.float().sum(), [layer.bone])
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(g16, g32, rtol=0.05, atol=0.3)

"""Quantised frozen base (--quant): QuantLinear against its dequantised weight, adapters on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_bone.errors import UserError
from rwkv_bone.peft.bone import BoneLinear
from rwkv_bone.peft.lora import LoraLinear
from rwkv_bone.peft.inject import quantize_frozen
from rwkv_bone.quant import QUANT_TYPES, QuantLinear, frozen_weight_bytes


def _linear(out=96, n_in=64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, out, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_quant_linear_is_its_dequantised_weight_values_and_input_gradient(quant):
    lin = _linear()
    q = QuantLinear(lin.weight, quant)
    w = q.dequantize()
    assert w.shape == lin.weight.shape
    err = (w - lin.weight).abs().max() / lin.weight.abs().max()
    assert 0 < err < (0.01 if quant == "int8" else 0.2)  # really quantised, and close
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    assert not any(True for _ in q.parameters())  # nothing trains


def _pair(make, quant):
    """(adapter on the quantised base, the same adapter on a plain linear holding W dequantised)."""
    lin = _linear()
    qlayer = make(lin)
    with torch.no_grad():
        for p in qlayer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ref = make(_linear())
    ref.load_state_dict(qlayer.state_dict())
    qlayer.qbase = QuantLinear(qlayer.weight, quant)
    qlayer.weight = None
    with torch.no_grad():
        ref.weight.copy_(qlayer.qbase.dequantize())
    return qlayer, ref


MAKERS = {
    "bone-row": lambda lin: BoneLinear(lin, 16, "row"),
    "bone-ab": lambda lin: BoneLinear(lin, 16, "ab"),
    "bone-col": lambda lin: BoneLinear(lin, 16, "col"),
    "lora": lambda lin: LoraLinear(lin, 4),
}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_adapter_on_quantised_base_equals_adapter_on_dequantised_base(kind, quant):
    qlayer, ref = _pair(MAKERS[kind], quant)
    x = torch.randn(3, 7, 64, dtype=torch.float32)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yr = qlayer(xq), ref(xr)
    torch.testing.assert_close(yq, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yq)
    names = ref.adapter_names()
    gq = torch.autograd.grad(yq, [xq, *(getattr(qlayer, n) for n in names)], g)
    gr = torch.autograd.grad(yr, [xr, *(getattr(ref, n) for n in names)], g)
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qlayer.delta_weight(), ref.delta_weight(), rtol=1e-5, atol=1e-6)


def test_bone_row_on_quantised_base_saves_no_weight_sized_tensor():
    """Bone-row keeps x (N, in) and small tensors for backward: nothing of the (out, in) shape."""
    qlayer, _ = _pair(MAKERS["bone-row"], "nf4")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        qlayer(torch.randn(5, 64, requires_grad=True)).sum()
    assert saved and all(s.numel() < 96 * 64 for s in map(torch.Size, saved)), saved


def _tiny(n_embd=256, vocab=64, n_layer=2):
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6

    torch.manual_seed(0)
    return RWKV6.from_config(RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab), device="cpu")


@pytest.mark.parametrize("method", ["bone", "pissa"])
def test_quantised_model_equals_the_model_on_dequantised_weights(method):
    """QPiSSA: W_res = W - B0 A0 is what is quantised; the quantised model then equals the model
    whose adapted linears hold the dequantised weights."""
    from rwkv_bone.peft import apply_peft

    model = _tiny(128)
    apply_peft(model, method, bone_b=32, lora_r=4)
    ref = _tiny(128)
    apply_peft(ref, method, bone_b=32, lora_r=4)
    names = quantize_frozen(model, "nf4")
    assert len(names) == 16
    with torch.no_grad():
        for n in names:
            ref.get_submodule(n).weight.copy_(model.get_submodule(n).qbase.dequantize())
    x = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_nf4_frozen_weights_are_at_most_035_of_bf16():
    from rwkv_bone.peft import apply_peft
    from rwkv_bone.train.run import cast_for_training

    sizes = {}
    for quant in ("none", "nf4", "int8"):
        model = _tiny(512, n_layer=1)  # the linears dominate (as in released models)
        apply_peft(model, "bone", bone_b=64)
        if quant != "none":
            quantize_frozen(model, quant)
        cast_for_training(model, bf16=True)
        sizes[quant], label = frozen_weight_bytes(model)
        assert label == ("bf16" if quant == "none" else f"bf16 + {quant}")
    assert sizes["nf4"] <= 0.35 * sizes["none"], sizes
    assert sizes["int8"] <= 0.6 * sizes["none"], sizes


def test_quantize_frozen_needs_adapters():
    with pytest.raises(UserError, match="apply an adapter"):
        quantize_frozen(_tiny(64), "nf4")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_train_helpers import pattern_data, tiny_checkpoint

    d = tmp_path_factory.mktemp("quant")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern"))}


@pytest.mark.parametrize("over", [dict(peft="bone", quant="nf4"),
                                  dict(peft="pissa", quant="int8", lora_r=4, bone_b=None)])
def test_quantised_training_lowers_the_loss_and_saves_only_the_adapter(files, tmp_path, capsys, over):
    import csv
    import os

    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import merge_state_dict, read_adapter_file
    from rwkv_bone.train import parse_args, run

    from test_train_helpers import base_flags

    proj = str(tmp_path / "q")
    assert run(parse_args(base_flags(files["ckpt"], files["data"], proj, precision="bf16",
                                     epoch_steps=6, epoch_count=1, **over))) == 0
    out = capsys.readouterr().out
    assert f"frozen weights: " in out and f"(bf16 + {over['quant']})" in out
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[-1] < losses[0]
    path = os.path.join(proj, "rwkv-0.pth")
    af = read_adapter_file(path)
    assert all(v.dtype == torch.float32 for layer in af.layers.values() for v in layer.values())
    # merged into the original full-precision base, the adapter changes the model
    from rwkv_bone.checkpoint import load_state_dict

    base = load_state_dict(files["ckpt"])
    merged = RWKV6.from_state_dict(merge_state_dict(base, af))
    x = torch.randint(1, 64, (1, 8))
    assert not torch.allclose(merged(x), RWKV6.from_state_dict(base)(x))


def test_quant_without_an_adapter_is_a_user_error(files):
    from rwkv_bone.train import parse_args

    from test_train_helpers import base_flags

    with pytest.raises(UserError, match="use an adapter"):
        parse_args(base_flags(files["ckpt"], files["data"], "x", peft="none", bone_b=None, quant="nf4"))



@pytest.mark.parametrize("method", ["miss", "state"])
def test_quant_with_an_unsupported_method_is_one_sentence(files, method):
    from rwkv_bone.train import parse_args

    from test_train_helpers import base_flags

    with pytest.raises(UserError, match=f"--peft {method} does not support it yet, so drop --quant"):
        parse_args(base_flags(files["ckpt"], files["data"], "x", peft=method, bone_b=None, quant="nf4"))


def test_quantised_layer_survives_a_bf16_cast_of_the_module():
    """DeepSpeed's bf16 mode calls module.bfloat16(): the quantisation scales must stay exact."""
    lin = _linear()
    q = QuantLinear(lin.weight, "nf4")
    w = q.dequantize()
    q.bfloat16()
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=0)


def test_device_check_passes_on_cpu_and_names_the_alternative_when_it_fails(monkeypatch):
    import rwkv_bone.quant as Q

    for quant in QUANT_TYPES:
        Q.check_device_support(quant, "cpu")

    def broken(self, x):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(Q.QuantLinear, "matmul", broken)
    with pytest.raises(UserError, match="cannot run --quant nf4 on cpu.*use --quant int8"):
        Q.check_device_support("nf4", "cpu")

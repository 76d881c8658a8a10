"""Adapters inside RWKV-6: injection, what trains, paper counts, merging, adapter files."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from conftest import random_model as _random_model
from rwkv_bone.errors import UserError
from rwkv_bone.model import RWKV6
from rwkv_bone.peft import (DEFAULT_TARGETS, adapter_modules, adapter_state_dict, apply_peft,
                            count_trainable, load_adapter, mark_trainable, merge_peft, save_adapter)



@functools.lru_cache(maxsize=None)
def _cached(seed: int, dtype: torch.dtype, overrides: tuple) -> RWKV6:
    return _random_model(seed, dtype, **dict(overrides))


def random_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> RWKV6:
    """A fresh copy of the conftest random model (built once per settings: it is slow to init)."""
    return copy.deepcopy(_cached(seed, dtype, tuple(sorted(overrides.items()))))


IDX = torch.tensor([[1, 5, 17, 99, 3, 250, 42, 7], [0, 2, 4, 8, 16, 32, 64, 128]])
METHOD_OPTIONS = {
    "bone-row": ("bone", dict(bone_b=32, bone_mode="row")),
    "bone-col": ("bone", dict(bone_b=32, bone_mode="col")),
    "bone-ab": ("bone", dict(bone_b=32, bone_mode="ab")),
    "lora": ("lora", dict(lora_r=4, lora_alpha=8)),
    "pissa": ("pissa", dict(pissa_r=4, svd_niter=2)),
    "olora": ("olora", dict(pissa_r=4)),
}


def perturb_adapters(model: RWKV6, std: float = 0.03, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            for kind in layer.adapter_names():
                p = getattr(layer, kind)
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("preset,count", [("1.6b", 33_030_144), ("3b", 55_050_240), ("7b", 88_080_384)])
def test_paper_trainable_counts_for_bone_b64_and_lora_r32(preset, count):
    assert count_trainable(preset, "bone", bone_b=64) == count
    assert count_trainable(preset, "lora", lora_r=32) == count


def test_count_trainable_adds_train_parts(tiny_config):
    base = count_trainable(tiny_config, "bone", bone_b=32)
    C, L, V = tiny_config.n_embd, tiny_config.n_layer, tiny_config.vocab_size
    assert count_trainable(tiny_config, "bone", ["emb", "head"], bone_b=32) == base + 2 * V * C
    # ln: ln0 (layer 0), ln1, ln2, ln_x per block, ln_out; weight + bias each
    assert count_trainable(tiny_config, "bone", ["ln"], bone_b=32) == base + 2 * C * (1 + 3 * L + 1)
    assert count_trainable(tiny_config, "pissa", pissa_r=16) == count_trainable(tiny_config, "lora", lora_r=16) == base


def test_apply_peft_wraps_eight_linears_and_only_adapters_train():
    model = random_model()
    names = apply_peft(model, "bone", bone_b=32)
    assert names == [f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.bone" for n in names}
    assert set(adapter_state_dict(model)) == trainable


def test_apply_peft_keeps_base_keys_and_parameters():
    model = random_model()
    before = {k: v for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    apply_peft(model, "lora", lora_r=4)
    after = model.state_dict()
    assert set(after) - set(before) == {f"{n}.{k}" for n in adapter_modules(model) for k in ("lora_A", "lora_B")}
    for n, p in model.named_parameters():
        if n in params:
            assert p is params[n]


def test_targets_select_layers():
    model = random_model()
    names = apply_peft(model, "bone", bone_b=32, targets="att.key,ffn.value")
    assert names == ["blocks.0.att.key", "blocks.0.ffn.value", "blocks.1.att.key", "blocks.1.ffn.value"]


def test_user_errors_of_apply_peft():
    with pytest.raises(UserError, match="unknown adapter target 'att.query'"):
        apply_peft(random_model(), "bone", targets=["att.query"])
    with pytest.raises(UserError, match="unknown fine-tuning method 'dora'"):
        apply_peft(random_model(), "dora")
    model = random_model()
    with pytest.raises(UserError, match="does not divide out_features=320 of layer blocks.0.ffn.key"):
        apply_peft(model, "bone", bone_b=128)
    assert not adapter_modules(model) and all(p.requires_grad for p in model.parameters())
    model = random_model()
    apply_peft(model, "bone", bone_b=32)
    with pytest.raises(UserError, match="already has adapters"):
        apply_peft(model, "lora")
    with pytest.raises(UserError, match="unknown train part 'bias'"):
        mark_trainable(model, ["bias"])


def test_mark_trainable_unfreezes_named_parts():
    model = random_model()
    apply_peft(model, "bone", bone_b=32)
    names = mark_trainable(model, "time,emb")
    assert "emb.weight" in names and "blocks.1.att.time_decay_w1" in names
    assert all(n == "emb.weight" or n.rsplit(".", 1)[1].startswith("time_") for n in names)
    assert model.peft_config["train_parts"] == ["emb", "time"]


@pytest.mark.parametrize("key", list(METHOD_OPTIONS))
def test_adapted_model_starts_equal_to_base(key):
    method, options = METHOD_OPTIONS[key]
    model = random_model()
    with torch.no_grad():
        want = model(IDX)
        apply_peft(model, method, **options)
        got = model(IDX)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", list(METHOD_OPTIONS))
def test_merge_peft_equals_adapted_model(key):
    method, options = METHOD_OPTIONS[key]
    model = random_model()
    apply_peft(model, method, **options)
    perturb_adapters(model)
    with torch.no_grad():
        want = model(IDX)
        base_logits = random_model()(IDX)
        assert (want - base_logits).abs().max() > 1e-3          # the adapters really do something
        merged = merge_peft(model)
        assert len(merged) == 16 and not adapter_modules(model)
        got = model(IDX)
    assert set(model.state_dict()) == set(random_model().state_dict())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_same_adapter_gradients():
    grads = []
    for grad_cp in (False, True):
        model = random_model()
        apply_peft(model, "bone", bone_b=32, bone_mode="col")
        perturb_adapters(model)
        model.train()
        model.grad_cp = grad_cp
        model(IDX).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_bf16_model_trains_float32_adapters():
    model = random_model(dtype=torch.bfloat16)
    apply_peft(model, "bone", bone_b=32)
    perturb_adapters(model)
    logits = model(IDX)
    assert logits.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    layer = model.blocks[0].att.key
    assert layer.weight.dtype == torch.bfloat16 and layer.bone.grad.dtype == torch.float32


@pytest.mark.parametrize("key", ["bone-row", "bone-col", "bone-ab", "lora", "pissa", "olora"])
def test_save_then_load_adapter_restores_the_adapted_model(tmp_path, key):
    method, options = METHOD_OPTIONS[key]
    model = random_model()
    apply_peft(model, method, **options)
    mark_trainable(model, ["time"])
    perturb_adapters(model)
    with torch.no_grad():
        model.blocks[0].att.time_maa_x.add_(0.1)
        want = model(IDX)
    path = tmp_path / "adapter.pth"
    save_adapter(model, path, extra_meta={"step": 7})
    fresh = random_model()                                      # the untouched base again
    loaded = load_adapter(fresh, path)
    assert "blocks.0.att.time_maa_x" in loaded
    assert fresh.peft_config["method"] == method and fresh.peft_config["train_parts"] == ["time"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), want, rtol=1e-5, atol=1e-5)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))


def test_saved_adapter_holds_only_trained_tensors_under_peer_keys(tmp_path):
    model = random_model()
    apply_peft(model, "bone", bone_b=32)
    save_adapter(model, tmp_path / "a.pth")
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    assert sd.pop("__peft__")
    assert set(sd) == {f"{n}.bone" for n in adapter_modules(model)}
    assert sd["blocks.0.ffn.value.bone"].shape == (320 // 32, 32, 32)


def test_load_adapter_refuses_mismatches(tmp_path):
    model = random_model()
    apply_peft(model, "bone", bone_b=32)
    save_adapter(model, tmp_path / "a.pth")
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    with pytest.raises(UserError, match=r"blocks.0.att.receptance.bone has shape \(4, 32, 32\) but the model needs \(6, 32, 32\)"):
        load_adapter(random_model(n_embd=192, dim_att=192), tmp_path / "a.pth")
    del sd["blocks.1.ffn.key.bone"]
    torch.save(sd, tmp_path / "b.pth")
    fresh = random_model()
    with pytest.raises(UserError, match="lacks blocks.1.ffn.key.bone"):
        load_adapter(fresh, tmp_path / "b.pth")
    assert not adapter_modules(fresh)                           # refused before touching it
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    sd["blocks.0.att.time_decay"] = torch.zeros(1, 1, 128)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(UserError, match="has blocks.0.att.time_decay that the model does not train"):
        load_adapter(random_model(), tmp_path / "c.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(random_model(), tmp_path / "nope.pth")
    with pytest.raises(UserError, match="no adapters to save"):
        save_adapter(random_model(), tmp_path / "d.pth")

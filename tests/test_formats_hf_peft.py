"""HF PEFT adapter folders against the real `peft` package: folders PEFT writes for an RWKV6 module
merge to exactly what PEFT's merge_and_unload gives, and folders we write load with
PeftModel.from_pretrained and give our outputs."""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, MissConfig, PeftModel, get_peft_model  # noqa: E402

from conftest import random_model as _random_model  # noqa: E402
from rwkv_bone.errors import UserError  # noqa: E402
from rwkv_bone.peft import adapter_modules, apply_peft, load_adapter, read_adapter_file, save_adapter  # noqa: E402
from rwkv_bone.peft.adapter_io import merge_state_dict  # noqa: E402

IDX = torch.tensor([[1, 5, 17, 99, 3, 250, 42, 7], [0, 2, 4, 8, 16, 32, 64, 128]])
TARGETS = ["att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.key",
           "ffn.receptance", "ffn.value"]


@functools.lru_cache(maxsize=None)
def _base():
    return _random_model(seed=1)


def base():
    return copy.deepcopy(_base())


def fill_nonzero(module: torch.nn.Module, names: tuple[str, ...], std: float = 0.05, seed: int = 0) -> int:
    """Random values into every parameter whose name contains one of `names`; returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


PEFT_CONFIGS = {
    "miss-default": lambda: MissConfig(r=32, target_modules=TARGETS),
    "miss-bat": lambda: MissConfig(r=32, target_modules=TARGETS, init_weights="bat"),
    "miss-mini": lambda: MissConfig(r=32, target_modules=TARGETS, init_weights="mini", mini_r=16),
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["att.key", "ffn.value", "att.output"]),
    "lora-rslora": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS),
}


@pytest.mark.parametrize("key", PEFT_CONFIGS)
def test_our_merge_of_a_peft_folder_equals_peft_merge_and_unload(tmp_path, key):
    pm = get_peft_model(base(), PEFT_CONFIGS[key]())
    assert fill_nonzero(pm, ("miss_block", "lora_A", "lora_B")) > 0
    pm.save_pretrained(tmp_path / "adapter")
    af = read_adapter_file(tmp_path / "adapter")
    assert af.meta["format"] == "hf-peft" and af.layers
    ours = merge_state_dict(base().state_dict(), af)
    want = pm.merge_and_unload().state_dict()
    assert set(ours) == set(want)
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    changed = [k for k in want if not torch.equal(want[k], _base().state_dict()[k])]
    assert len(changed) == len(af.layers)         # the merge did something, on every adapted layer
    # the safetensors file itself names a folder too
    af2 = read_adapter_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert af2.meta == af.meta


@pytest.mark.parametrize("key", ["miss-default", "miss-bat", "lora"])
def test_peft_folder_loads_into_our_model_with_peft_outputs(tmp_path, key):
    pm = get_peft_model(base(), PEFT_CONFIGS[key]())
    fill_nonzero(pm, ("miss_block", "lora_A", "lora_B"), seed=3)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = pm(IDX)
    model = base()
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), want, rtol=1e-5, atol=1e-5)


OUR_METHODS = {
    "bone-col": ("bone", dict(bone_b=32, bone_mode="col")),
    "miss": ("miss", dict(miss_r=32)),
    "miss-mini": ("miss", dict(miss_r=16, miss_mode="mini", miss_mini_r=32)),
    "lora": ("lora", dict(lora_r=4, lora_alpha=8)),
}


@pytest.mark.parametrize("key", OUR_METHODS)
def test_save_adapter_peft_format_loads_with_peft_from_pretrained(tmp_path, key):
    method, options = OUR_METHODS[key]
    model = base()
    apply_peft(model, method, **options)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            for kind in layer.adapter_names():
                getattr(layer, kind).add_(torch.randn(getattr(layer, kind).shape, generator=g) * 0.05)
        want = model(IDX)
    save_adapter(model, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("LORA" if method == "lora" else "MISS")
    pm = PeftModel.from_pretrained(base(), str(tmp_path / "peft"))
    with torch.no_grad():
        got = pm(IDX)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():                          # not trivially: the adapter changes the output
        assert (want - base()(IDX)).abs().max() > 1e-3
    back = read_adapter_file(tmp_path / "peft")   # and we read our own folder back
    assert back.meta["method"] == method


def test_save_adapter_peft_format_refuses_methods_peft_lacks(tmp_path):
    model = base()
    apply_peft(model, "bone", bone_b=32)          # Bone-row: no PEFT equivalent
    with pytest.raises(UserError, match="HF PEFT has no bone-row"):
        save_adapter(model, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_peft_folder_errors_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no adapter_config.json"):
        read_adapter_file(tmp_path / "empty")
    pm = get_peft_model(base(), MissConfig(r=32, target_modules=TARGETS))
    pm.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no adapter_model.safetensors or adapter_model.bin"):
        read_adapter_file(tmp_path / "a")

"""RWKV-PEFT's .pth adapter files (no metadata), built to the documented layout: `.disha` tensors
(2-D = MiSS, 3-D = block-affine Bone-row), state files and mixed files holding time_* / ln tensors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_model
from rwkv_bone.errors import UserError
from rwkv_bone.peft import apply_peft, load_adapter, mark_trainable, read_adapter_file
from rwkv_bone.peft.adapter_io import adapter_state_dict, merge_state_dict

IDX = torch.tensor([[1, 5, 17, 99, 3, 250, 42, 7]])


def _blocks(w: torch.Tensor, b: int, a: int, c: int) -> torch.Tensor:
    return w[a * b:(a + 1) * b, c * b:(c + 1) * b]


def test_3d_disha_is_block_affine_bone_row(tmp_path):
    b = 32
    bone = torch.randn(320 // b, b, b, generator=torch.Generator().manual_seed(0)) * 0.05
    torch.save({"blocks.1.ffn.value.disha": bone}, tmp_path / "peer.pth")
    af = read_adapter_file(tmp_path / "peer.pth")
    assert af.meta["method"] == "bone" and af.meta["bone_mode"] == "row" and af.meta["bone_b"] == b
    base = random_model().state_dict()
    got = merge_state_dict(base, af)["blocks.1.ffn.value.weight"]
    w = base["blocks.1.ffn.value.weight"]
    for a in range(128 // b):                     # the peer's merge rule, block by block
        for c in range(320 // b):
            want = _blocks(w, b, a, c) + _blocks(w, b, a, c) @ bone[c] + bone[c]
            torch.testing.assert_close(_blocks(got, b, a, c), want, rtol=1e-5, atol=1e-5)


def test_2d_disha_is_miss(tmp_path):
    r = 32
    m = torch.randn(r, 320, generator=torch.Generator().manual_seed(1))
    torch.save({"blocks.0.ffn.key.disha": m}, tmp_path / "peer.pth")
    af = read_adapter_file(tmp_path / "peer.pth")
    assert af.meta["method"] == "miss" and af.meta["miss_r"] == r
    base = random_model().state_dict()
    got = merge_state_dict(base, af)["blocks.0.ffn.key.weight"]
    x = torch.randn(5, 128)
    want = x @ base["blocks.0.ffn.key.weight"].t() + x.view(5, 128 // r, r).sum(1) @ m
    torch.testing.assert_close(x @ got.t(), want, rtol=1e-4, atol=1e-4)


def test_mixed_file_with_time_ln_and_state_loads_and_merges(tmp_path):
    """What RWKV-PEFT writes by default: adapters plus every time_* and ln tensor (its train_parts
    "time,ln"), here with a learned state as well; no metadata, .disha keys."""
    model = random_model()
    base_sd = copy.deepcopy(model.state_dict())
    apply_peft(model, "bone", bone_b=32)
    mark_trainable(model, "time,ln")
    for key in model.add_time_state():
        model.get_parameter(key).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        want = model(IDX)
    sd = {(k[:-5] + ".disha" if k.endswith(".bone") else k): v for k, v in adapter_state_dict(model).items()}
    assert any(k.endswith(".disha") for k in sd) and any(".ln1." in k for k in sd)
    torch.save(sd, tmp_path / "mixed.pth")
    af = read_adapter_file(tmp_path / "mixed.pth")
    assert af.meta["method"] == "bone" and af.meta["train_parts"] == ["ln", "time"] and len(af.states) == 2
    fresh = random_model()
    load_adapter(fresh, tmp_path / "mixed.pth")
    merged = random_model()
    merged_sd = merge_state_dict(base_sd, af)
    merged.add_time_state(merged_sd)
    merged.load_state_dict(merged_sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), want, rtol=0, atol=0)
        torch.testing.assert_close(merged(IDX), want, rtol=1e-5, atol=1e-5)
    trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}


def test_state_only_peer_file(tmp_path):
    H, N = 2, 64
    states = {f"blocks.{i}.att.time_state": torch.randn(H, N, N) * 0.1 for i in range(2)}
    torch.save(states, tmp_path / "state.pth")
    af = read_adapter_file(tmp_path / "state.pth")
    assert af.meta["method"] == "state" and not af.layers and set(af.states) == set(states)
    model = random_model()
    load_adapter(model, tmp_path / "state.pth")
    for i in range(2):
        torch.testing.assert_close(model.blocks[i].att.time_state.detach(), states[f"blocks.{i}.att.time_state"])


def test_mixing_2d_and_3d_bone_tensors_is_refused(tmp_path):
    torch.save({"blocks.0.att.key.disha": torch.zeros(4, 32, 32),
                "blocks.0.att.value.disha": torch.zeros(32, 128)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="mixes 2-D"):
        read_adapter_file(tmp_path / "bad.pth")

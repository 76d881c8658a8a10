"""Loading official checkpoints: prefixes, wrappers, and one clear refusal per kind of wrong file."""
from __future__ import annotations

import os

import pytest
import torch

from rwkv_bone.checkpoint import load_state_dict
from rwkv_bone.config import RWKV6Config
from rwkv_bone.errors import UserError
from rwkv_bone.model import RWKV6

from conftest import TINY


def _sd(path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("prefix", ["_forward_module.", "model.", "module.", "_forward_module.module."])
def test_wrapper_prefixes_are_stripped(tiny_checkpoint, tmp_path, prefix):
    path = tiny_checkpoint()
    sd = _sd(path)
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "wrapped.pth")
    loaded = load_state_dict(tmp_path / "wrapped.pth")
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    model = RWKV6.from_checkpoint(tmp_path / "wrapped.pth")
    assert model.config == RWKV6Config(**TINY)


def test_path_without_pth_suffix_is_accepted(tiny_checkpoint):
    path = tiny_checkpoint("named.pth")
    assert RWKV6.from_checkpoint(str(path)[: -len(".pth")]).config == RWKV6Config(**TINY)


def test_lightning_style_nested_state_dict_loads(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "l.ckpt")
    assert list(load_state_dict(tmp_path / "l.ckpt")) == list(sd)


def test_legacy_non_zip_checkpoint_loads(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    loaded = load_state_dict(tmp_path / "old.pth")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*nope.pth does not exist; check the path"):
        RWKV6.from_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder; pass the .pth file itself"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("content", [b"hello, I am text\n", b"", b"PK\x03\x04garbage"], ids=["text", "empty", "bad-zip"])
def test_non_torch_file_is_refused(tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint .*expected an RWKV-6 .pth"):
        load_state_dict(tmp_path / "x.pth")


def test_truncated_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint().read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "cut.pth")


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    torch.save({"emb.weight": torch.zeros(2), "cfg": ValueError("x")}, tmp_path / "obj.pth")
    with pytest.raises(UserError, match="holds Python objects besides tensors"):
        load_state_dict(tmp_path / "obj.pth")


def test_non_dict_and_non_tensor_entries_are_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        load_state_dict(tmp_path / "list.pth")
    torch.save({"emb.weight": torch.zeros(2), "_strategy": "cpu fp32"}, tmp_path / "conv.pth")
    with pytest.raises(UserError, match="non-tensor entry '_strategy'"):
        load_state_dict(tmp_path / "conv.pth")


def test_unrelated_state_dict_is_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "bert.pth")
    with pytest.raises(UserError, match=r"does not look like an RWKV model \(it has no emb.weight or blocks.\* tensors; found encoder.weight\)"):
        load_state_dict(tmp_path / "bert.pth")


def _other_generation(kind: str) -> dict:
    C = 8
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    sd = {"emb.weight": z(10, C), "blocks.0.ln0.weight": z(C), "head.weight": z(10, C)}
    att = "blocks.0.att."
    if kind == "v4":
        sd.update({att + "time_decay": z(C), att + "time_first": z(C), att + "time_mix_k": z(1, 1, C)})
    elif kind == "v5-time_mix":
        sd.update({att + "time_mix_k": z(1, 1, C), att + "time_faaaa": z(1, C), att + "ln_x.weight": z(C)})
    elif kind == "v5.2":
        sd.update({att + "time_decay": z(1, C), att + "time_faaaa": z(1, C), att + "ln_x.weight": z(C)})
    elif kind == "v7":
        sd.update({att + "w0": z(1, 1, C), att + "a0": z(1, 1, C), att + "x_r": z(1, 1, C), att + "r_k": z(1, C)})
    return sd


@pytest.mark.parametrize(
    "kind, found",
    [
        ("v4", r"an RWKV-4 \(keys like att.time_first, att.time_mix_k\) model"),
        ("v5-time_mix", r"an RWKV-5 \(keys ln_x with time_mix_k / time_first\) model"),
        ("v5.2", r"an RWKV-5 \(time_faaaa present but no time_maa_w1\) model"),
        ("v7", r"an RWKV-7 \(keys like att.w0, att.a0, att.x_r\) model"),
    ],
)
def test_other_rwkv_generations_are_refused_by_name(tmp_path, kind, found):
    torch.save(_other_generation(kind), tmp_path / "m.pth")
    with pytest.raises(UserError, match=found + r", but rwkv-bone needs an RWKV-6 \(x060\) checkpoint"):
        RWKV6.from_checkpoint(tmp_path / "m.pth")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    del sd["blocks.1.ffn.time_maa_r"], sd["ln_out.bias"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"is missing tensor blocks.1.ffn.time_maa_r and 1 more; expected a complete RWKV-6 model with 2 layers"):
        load_state_dict(tmp_path / "m.pth")


def test_missing_shape_source_tensor_is_named(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    del sd["blocks.0.att.time_decay_w1"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"no tensor blocks.0.att.time_decay_w1 \(needed to read Dd\)"):
        load_state_dict(tmp_path / "m.pth")


def test_misshaped_tensor_names_key_found_and_expected(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    sd["blocks.1.att.time_maa_w2"] = torch.zeros(5, 32, 128)  # block 0 says Dm = 16
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"tensor blocks.1.att.time_maa_w2 has shape \(5, 32, 128\) but \(5, 16, 128\) was expected"):
        load_state_dict(tmp_path / "m.pth")


def test_extra_keys_refused_unless_allowed(tiny_checkpoint, tmp_path):
    sd = _sd(tiny_checkpoint())
    sd["blocks.0.att.key.bone"] = torch.zeros(64, 128)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"unexpected tensor blocks.0.att.key.bone beyond the RWKV-6 layout \(adapter weights\?\)"):
        RWKV6.from_checkpoint(tmp_path / "m.pth")
    model = RWKV6.from_checkpoint(tmp_path / "m.pth", allow_extra_keys=True)
    assert "blocks.0.att.key.bone" not in model.state_dict()
    assert torch.equal(model.blocks[0].att.key.weight, sd["blocks.0.att.key.weight"])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_loaded_checkpoint_is_memory_mapped_not_copied(tiny_checkpoint):
    path = tiny_checkpoint()
    sd = load_state_dict(path)
    spans = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    assert spans, "the checkpoint file is not mapped"
    for key, t in sd.items():
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans), key

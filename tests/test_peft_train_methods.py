"""train.py with --peft miss / --peft state / --adapter_format peft: short in-process runs on the
tiny model (CPU, fp32) whose epoch files reproduce the trained model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.model import RWKV6
from rwkv_bone.peft.adapter_io import load_adapter
from rwkv_bone.train import parse_args
from rwkv_bone.train.args import DEFAULT_STATE_LR
from rwkv_bone.train.run import build_run, fit_run

from test_train_helpers import VOCAB, base_flags, pattern_data, tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_methods")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern")), "dir": d}


def run_and_reload(files, proj: str, name: str, **flags) -> tuple[RWKV6, RWKV6]:
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], proj, bone_b=None, epoch_count=1, **flags)))
    assert fit_run(tr) == 0
    loaded = RWKV6.from_checkpoint(files["ckpt"])
    load_adapter(loaded, os.path.join(proj, name))
    return tr.module.model.eval(), loaded


@pytest.mark.parametrize("flags", [dict(peft="miss", miss_r=16),
                                   dict(peft="miss", miss_r=16, miss_mode="mini", miss_mini_r=16),
                                   dict(peft="state", lr_init=DEFAULT_STATE_LR, train_parts="ln")])
def test_miss_and_state_runs_save_files_that_reproduce_the_model(files, tmp_path, flags):
    trained, loaded = run_and_reload(files, str(tmp_path / "run"), "rwkv-0.pth", **flags)
    x = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(RWKV6.from_checkpoint(files["ckpt"])(x), trained(x))
    keys = torch.load(tmp_path / "run" / "rwkv-0.pth", weights_only=True)
    meta = json.loads(keys.pop("__peft__"))
    assert meta["method"] == flags["peft"]
    if flags["peft"] == "state":
        assert {k for k in keys if k.endswith("time_state")} == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
        assert "blocks.0.ln1.weight" in keys


def test_adapter_format_peft_writes_a_peft_folder(files, tmp_path):
    peft = pytest.importorskip("peft")
    trained, loaded = run_and_reload(files, str(tmp_path / "run"), "rwkv-0", peft="miss", miss_r=16,
                                     adapter_format="peft")
    assert sorted(os.listdir(tmp_path / "run" / "rwkv-0")) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(RWKV6.from_checkpoint(files["ckpt"]), str(tmp_path / "run" / "rwkv-0"))
    x = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(pm(x), trained(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,message", [
    (dict(peft="bone", bone_b=16, adapter_format="peft"), "--adapter_format peft exists for --bone_mode col, miss and lora"),
    (dict(peft="miss", miss_mode="mini"), "--miss_mode mini needs a positive --miss_mini_r"),
    (dict(peft="miss", miss_mini_r=8), "--miss_mini_r applies to --miss_mode mini only"),
    (dict(peft="lora", adapter_format="peft", train_parts="ln"), "holds adapter tensors only"),
])
def test_flag_combinations_that_cannot_work(files, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(base_flags(files["ckpt"], files["data"], str(tmp_path), **flags))


def test_state_tuning_default_lr(files, tmp_path):
    flags = base_flags(files["ckpt"], files["data"], str(tmp_path), peft="state", bone_b=None)
    i = flags.index("--lr_init")
    args = parse_args(flags[:i] + flags[i + 2:])
    assert args.lr_init == DEFAULT_STATE_LR
    flags = base_flags(files["ckpt"], files["data"], str(tmp_path))
    i = flags.index("--lr_init")
    assert parse_args(flags[:i] + flags[i + 2:]).lr_init == 2e-5

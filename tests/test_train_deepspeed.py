"""DeepSpeed ZeRO through Lightning on CPU: two gloo processes train, save a plain adapter, resume."""
from __future__ import annotations

import csv
import os
import sys

import pytest
import torch

from test_train_helpers import base_flags, pattern_data, tiny_checkpoint, train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_ds")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern")), "dir": d}


def ds_flags(files, proj: str, **over) -> list[str]:
    opts = dict(strategy="deepspeed_stage_2", devices=2, epoch_steps=3, epoch_count=2)
    opts.update(over)
    return base_flags(files["ckpt"], files["data"], proj, **opts)


@pytest.fixture(scope="module")
def uninterrupted(files):
    """The run the module checks, started where a run killed while DeepSpeed JIT-built its
    shared-memory op left that build's lock (torch's FileBaton waits on it forever): our CPU
    strategy never builds that op, so the run does not wait."""
    ext = files["dir"] / "torch_extensions"
    build_folder = f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"  # torch's per-Python sub-folder
    for folder in (ext / "deepspeed_shm_comm", ext / build_folder / "deepspeed_shm_comm"):
        folder.mkdir(parents=True)
        (folder / "lock").touch()
    proj = str(files["dir"] / "full")
    r = train_cli(ds_flags(files, proj), env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return proj


def test_zero2_on_two_cpu_processes_trains_and_saves_a_plain_adapter(files, uninterrupted):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import load_adapter

    with open(os.path.join(uninterrupted, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert int(rows[-1]["tokens"]) == 6 * 2 * 2 * 16  # micro_bsz x devices x ctx_len per step
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0]

    path = os.path.join(uninterrupted, "rwkv-1.pth")
    sd = torch.load(path, weights_only=True)
    assert "__peft__" in sd and all(k.endswith(".bone") for k in sd if k != "__peft__")
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for k, v in sd.items() if k != "__peft__")
    model = RWKV6.from_checkpoint(files["ckpt"])
    load_adapter(model, path)
    x = torch.randint(1, 64, (1, 8))
    assert not torch.allclose(model(x), RWKV6.from_checkpoint(files["ckpt"])(x))
    # the resumable state holds what trains, not the frozen base model
    state_dir = os.path.join(uninterrupted, "state")
    tags = [d for d in os.listdir(state_dir) if d.startswith("step-")]
    assert tags == ["step-000000006"]
    module_states = os.path.join(state_dir, tags[0], "mp_rank_00_model_states.pt")
    assert os.path.getsize(module_states) < os.path.getsize(files["ckpt"]) / 2


def test_zero2_resume_continues_to_the_same_adapter(files, uninterrupted):
    proj = str(files["dir"] / "parts")
    # stop after 3 of 6 steps (3 steps x 64 tokens), then resume to the end
    r = train_cli(ds_flags(files, proj, my_exit_tokens=3 * 64))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not os.path.exists(os.path.join(proj, "rwkv-1.pth"))
    r = train_cli(ds_flags(files, proj, resume=True))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a = torch.load(os.path.join(uninterrupted, "rwkv-1.pth"), weights_only=True)
    b = torch.load(os.path.join(proj, "rwkv-1.pth"), weights_only=True)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(b[k], v), k  # bit-identical on CPU fp32


def test_zero3_bf16_pissa_saves_full_fp32_tensors_and_exact_init_factors(files, uninterrupted):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft
    from rwkv_bone.peft.adapter_io import load_adapter

    proj = str(files["dir"] / "zero3")
    r = train_cli(ds_flags(files, proj, strategy="deepspeed_stage_3", precision="bf16", epoch_count=1,
                           peft="pissa", pissa_r=4, bone_b=None, lr_init=1e-3))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    path = os.path.join(proj, "rwkv-0.pth")
    sd = torch.load(path, weights_only=True)
    # the initial factors the run used (bf16 base, factorised in fp32 with the run's seed)
    ref = RWKV6.from_checkpoint(files["ckpt"], dtype=torch.bfloat16)
    torch.manual_seed(42)
    apply_peft(ref, "pissa", pissa_r=4)
    key = ref.blocks[1].ffn.value
    assert torch.equal(sd["blocks.1.ffn.value.init_lora_A"], key.init_A)  # fp32, not DeepSpeed's bf16 cast
    assert torch.equal(sd["blocks.1.ffn.value.init_lora_B"], key.init_B)
    for name in ("lora_A", "lora_B"):  # complete tensors (not ZeRO-3 partitions), fp32 master copies
        t = sd[f"blocks.1.ffn.value.{name}"]
        assert t.dtype == torch.float32 and t.shape == getattr(key, name).shape
        assert not torch.equal(t, getattr(key, name).float())  # trained
    load_adapter(RWKV6.from_checkpoint(files["ckpt"]), path)
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        first_bf16 = float(next(csv.DictReader(f))["loss"])
    with open(os.path.join(uninterrupted, "metrics.csv"), newline="") as f:
        first_fp32 = float(next(csv.DictReader(f))["loss"])
    assert first_bf16 == pytest.approx(first_fp32, abs=0.05)  # same data, same start, bf16 rounding only


def test_zero2_infctx_trains_the_same_adapter_as_whole_samples(files, uninterrupted):
    proj = str(files["dir"] / "infctx")
    r = train_cli(ds_flags(files, proj, train_type="infctx", chunk_ctx=5))  # ctx 16: chunks 5, 5, 5, 1
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a = torch.load(os.path.join(uninterrupted, "rwkv-1.pth"), weights_only=True)
    b = torch.load(os.path.join(proj, "rwkv-1.pth"), weights_only=True)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            # same math, other summation order; lr 1e-2 for 6 Adam steps amplifies fp32 rounding on
            # near-zero gradients (the fp32 single-process test in test_infctx.py holds 1e-5)
            # (element-wise up to 3.7e-4 seen on 1 of 1024 entries across runs: held by norm here)
            assert (b[k] - v).norm() <= 1e-2 * v.norm(), k

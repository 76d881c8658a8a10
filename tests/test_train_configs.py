"""The paper-setting scripts in configs/ build a valid train.py command with equal trainable counts."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test_train_helpers import REPO, pattern_data, tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_cfg")
    # n_embd 128: every linear dimension (128, 448) is a multiple of the paper's b = 64
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth"), n_embd=128), "data": pattern_data(str(d / "p")), "dir": d}


def run_script(name: str, *args: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO, **env)
    return subprocess.run(["bash", os.path.join(REPO, "configs", name), *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_config_script_builds_the_paper_command(files):
    r = run_script("rwkv6-3b.sh", "lora", files["ckpt"], files["data"], str(files["dir"] / "lora"), "--dry_run")
    assert r.returncode == 0, r.stderr
    counts = {re.search(r"trainable parameters: ([\d,]+)", r.stdout).group(1)}
    r = run_script("rwkv6-1.6b.sh", "bone", files["ckpt"], files["data"], str(files["dir"] / "o"), "--dry_run",
                   GPUS="2", MICRO_BSZ="8")
    assert r.returncode == 0, r.stderr
    cmd = r.stderr  # `set -x` echoes the command
    for flag in ("--peft bone --bone_b 64", "--ctx_len 512", "--micro_bsz 8", "--accumulate_grad_batches 4",
                 "--devices 2", "--strategy deepspeed_stage_2", "--precision bf16", "--grad_cp 1",
                 "--lr_init 2e-5", "--lr_schedule constant", "--epoch_steps 1"):  # 40 documents / 64 -> 1 step
        assert flag in cmd, flag
    counts.add(re.search(r"trainable parameters: ([\d,]+)", r.stdout).group(1))
    assert counts == {f"{2 * 86016:,}"}  # Bone b=64 and LoRA r=32 train equally many parameters


def test_config_script_refuses_a_batch_split_that_misses_64(files):
    r = run_script("rwkv6-7b.sh", "bone", files["ckpt"], files["data"], GPUS="3")
    assert r.returncode == 2 and "must divide the global batch 64" in r.stderr
    r = run_script("rwkv6-3b.sh", "dora", files["ckpt"], files["data"])
    assert r.returncode == 2 and "METHOD must be bone, lora or pissa" in r.stderr

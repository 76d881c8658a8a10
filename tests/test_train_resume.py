"""train.py as a user runs it: killed with SIGKILL and resumed, and logging to W&B offline."""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_helpers import REPO, TRAIN, base_flags, pattern_data, tiny_checkpoint, train_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_resume")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern"))}


def read_rows(proj: str) -> list[list[str]]:
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        return list(csv.reader(f))


def state_step(proj: str) -> int:
    path = os.path.join(proj, "last-state.pth")
    if not os.path.isfile(path):
        return -1
    return int(torch.load(path, weights_only=True)["step"])


def test_run_killed_with_sigkill_then_resumed_equals_uninterrupted_run(files, tmp_path):
    # LoRA with dropout: the resumed run must also repeat the random dropout masks.
    opts = dict(peft="lora", lora_r=4, lora_dropout=0.1, epoch_steps=10, epoch_count=4, lr_init=5e-3,
                bone_b=None, lr_schedule="cosine", lr_final=1e-4, warmup_steps=3)
    proj_a, proj_b = str(tmp_path / "a"), str(tmp_path / "b")
    r = train_cli(base_flags(files["ckpt"], files["data"], proj_a, **opts))
    assert r.returncode == 0, r.stderr[-2000:]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    flags_b = base_flags(files["ckpt"], files["data"], proj_b, save_every_steps=1, **opts)
    proc = subprocess.Popen([sys.executable, TRAIN, *flags_b], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and state_step(proj_b) < 8 and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = state_step(proj_b)
    assert 8 <= killed_at < 40

    r = train_cli(flags_b + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    final_a = torch.load(os.path.join(proj_a, "rwkv-3.pth"), weights_only=True)
    final_b = torch.load(os.path.join(proj_b, "rwkv-3.pth"), weights_only=True)
    assert final_a.keys() == final_b.keys()
    for k, v in final_a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, final_b[k]), k  # bit-identical
    rows_a, rows_b = read_rows(proj_a), read_rows(proj_b)
    assert [r[0] for r in rows_b[1:]] == [str(s) for s in range(1, 41)]  # each step once
    assert [r[1:3] for r in rows_b] == [r[1:3] for r in rows_a]  # same losses and learning rates
    for name in os.listdir(proj_b):  # nothing half-written survives
        assert ".tmp" not in name
        if name.endswith(".pth"):
            torch.load(os.path.join(proj_b, name), weights_only=True)
    assert "resumed at step" in open(os.path.join(proj_b, "train_log.txt")).read()


def _wandb_losses(record_file: str) -> list[float]:
    """Loss values in an offline W&B run log (history items `loss` with their JSON value)."""
    data = open(record_file, "rb").read()
    out = []
    for m in re.finditer(rb"\x12\x04loss\x82\x01", data):
        n = data[m.end()]
        out.append(json.loads(data[m.end() + 1:m.end() + 1 + n]))
    return out


def test_wandb_offline_records_the_losses(files, tmp_path):
    proj, wdir = str(tmp_path / "run"), str(tmp_path / "wandb")
    os.makedirs(wdir)
    r = train_cli(base_flags(files["ckpt"], files["data"], proj, epoch_count=1, wandb="rwkv-bone-test"),
                  env={"WANDB_MODE": "offline", "WANDB_DIR": wdir, "WANDB_SILENT": "true"},
                  process=True)  # wandb finishes its run file when the process exits
    assert r.returncode == 0, r.stderr[-2000:]
    runs = glob.glob(os.path.join(wdir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1
    logged = _wandb_losses(runs[0])
    csv_losses = [float(row[1]) for row in read_rows(proj)[1:]]
    assert len(csv_losses) == 4
    assert sorted(set(round(v, 6) for v in logged)) == sorted(set(csv_losses))

"""bench/memory_plan.py: the plan's arithmetic from its measured parts, and --measured (the column
scripts/gpu_check.sh puts beside the plan: a train.py run's peak from its metrics.csv)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import memory_plan  # noqa: E402


def write_metrics(path, peaks):
    with open(path, "w") as f:
        f.write("step,loss,lr,tokens,kt/s,peak_mem_mb,valid_loss,valid_ppl,valid_acc\n")
        for i, p in enumerate(peaks, 1):
            f.write(f"{i},2.0,0.001,4096,1.0,{p},,,\n")


def test_measured_peak_is_the_largest_row(tmp_path):
    path = tmp_path / "metrics.csv"
    write_metrics(path, [100.5, 4096.0, 2048.25])
    assert memory_plan.measured_peak_bytes(str(path)) == 4096 * 2 ** 20


@pytest.mark.parametrize("content, words", [
    (None, "cannot read"),
    ("a,b\n1,2\n", "not a train.py metrics.csv"),
    ("step,loss,lr,tokens,kt/s,peak_mem_mb,valid_loss,valid_ppl,valid_acc\n", "no training steps"),
])
def test_bad_metrics_file_is_one_sentence_exit_2(tmp_path, content, words):
    path = tmp_path / "metrics.csv"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory_plan.py"), "--measured", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""  # refused before any measuring


def test_plan_adds_its_parts_and_grad_cp_keeps_block_inputs(monkeypatch):
    """plan() from stubbed measurements: with grad_cp every block keeps its input and one block's
    saved tensors exist during its recompute; without, every block keeps all it saves."""
    parts = dict(outside=1000, block=300, block_input=10, ce_chunk=7)
    monkeypatch.setattr(memory_plan, "measure_activations", lambda a, bsz: dict(parts))
    monkeypatch.setattr(memory_plan, "model_states", lambda a: dict(trained=50, frozen=60, trainable_params=1,
                                                                     total_params=2))
    L = 24  # the 1.6b preset's n_layer
    a = argparse.Namespace(model_preset="1.6b", micro_bsz=4, measure_bsz=1, grad_cp=1, check_linear=False)
    r = memory_plan.plan(a)
    assert r["activations"] == 4 * (1000 + L * 10 + 300)
    assert r["total"] == 50 + 60 + r["activations"] + 7
    a.grad_cp = 0
    assert memory_plan.plan(a)["activations"] == 4 * (1000 + L * 300)

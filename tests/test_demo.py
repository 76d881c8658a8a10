"""`make demo` end to end at a few steps: every artefact the README promises lands in --out."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_leaves_every_artefact(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--out", str(out), "--pretrain_steps", "3", "--finetune_steps", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rel in ("data/pretrain.bin", "data/sft.mask.idx", "base/rwkv-0.pth", "base/loss.png",
                "bone/rwkv-0.pth", "bone/loss.png", "lora/rwkv-0.pth", "merged.pth", "finetune_loss.png"):
        assert (out / rel).is_file(), rel
    merged = torch.load(out / "merged.pth", map_location="cpu", weights_only=True)
    assert not any("bone" in k or "lora" in k for k in merged)
    assert "after Bone:" in done.stdout and "merged checkpoint:" in done.stdout


def test_demo_refuses_bad_step_counts():
    done = subprocess.run([sys.executable, "scripts/demo.py", "--pretrain_steps", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --pretrain_steps and --finetune_steps must be positive"

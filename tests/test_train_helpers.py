"""Shared fixtures for the trainer tests: a tiny random RWKV-6 checkpoint and tiny binidx data.

(A module of helpers, not tests: pytest collects nothing from it.)"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
VOCAB = 64


def tiny_checkpoint(path: str, n_layer: int = 2, n_embd: int = 64, vocab: int = VOCAB, seed: int = 0) -> str:
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6

    torch.manual_seed(seed)
    model = RWKV6.from_config(RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab), device="cpu")
    model.init_weights()
    with torch.no_grad():  # the reference init zeroes some outputs; make every weight matter
        for name, p in model.named_parameters():
            if name.endswith(("output.weight", "ffn.value.weight", "ffn.receptance.weight")):
                p.normal_(0, 0.05)
    model.save_checkpoint(path)
    return path


def pattern_data(prefix: str, n_docs: int = 40, doc_len: int = 60, vocab: int = VOCAB, seed: int = 0) -> str:
    """Documents made of a repeating 8-token pattern at a random phase: easy to learn."""
    from rwkv_bone.data.binidx import write_binidx

    rng = np.random.default_rng(seed)
    base = np.arange(1, 9)
    docs = [list(np.roll(base, rng.integers(8))[np.arange(doc_len) % 8] + 8 * (i % 3)) + [0] for i in range(n_docs)]
    write_binidx(prefix, docs, np.uint16)
    return prefix


def sft_data(prefix: str, docs: list[list[int]], masks: list[list[int]]) -> str:
    from rwkv_bone.data.binidx import write_binidx

    write_binidx(prefix, docs, np.uint16)
    write_binidx(prefix + ".mask", masks, np.uint8)
    return prefix


def base_flags(ckpt: str, data: str, proj: str, **over) -> list[str]:
    flags = {"load_model": ckpt, "data_file": data, "proj_dir": proj, "ctx_len": 16, "micro_bsz": 2,
             "epoch_steps": 4, "epoch_count": 2, "lr_init": 1e-2, "precision": "fp32", "accelerator": "cpu",
             "peft": "bone", "bone_b": 16, "progress": 0, "grad_clip": 1.0}
    flags.update(over)
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", str(v)]
    return out


def train_cli(flags: list[str], env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, TRAIN, *flags], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO, **kw)

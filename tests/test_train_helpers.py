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


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on localhost (held together while chosen, so none repeats)."""
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def side_by_side(jobs: list, workers: int = 2) -> list:
    """Call the functions in `jobs` (each taking a MASTER_PORT environment dict) at most `workers`
    at a time; their results in order (an exception is re-raised by the caller's .result()).

    A train.py launch keeps about one of two CPU cores busy (imports, the second process starting,
    saving), so two side by side take little more wall time than one. Each job gets its own
    MASTER_PORT: the two-process runs would otherwise each pick a free port on their own, and
    DeepSpeed's shared-memory all-reduce names its buffers by that port. The runs themselves are
    the ones train_cli makes one after another (CPU fp32 on OMP_NUM_THREADS=1: bit for bit)."""
    from concurrent.futures import ThreadPoolExecutor

    ports = free_ports(len(jobs))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job, {"MASTER_PORT": str(port)}) for job, port in zip(jobs, ports)]
        return [f.result() for f in futures]


def train_cli_side_by_side(flag_lists: list[list[str]], env: dict | None = None, timeout: float = 300,
                           workers: int = 2) -> list[subprocess.CompletedProcess]:
    """train_cli for each flag list, at most `workers` launches at a time (see side_by_side)."""
    return side_by_side([lambda port, f=f: train_cli(f, {**(env or {}), **port}, timeout) for f in flag_lists],
                        workers)

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


def train_cli(flags: list[str], env: dict | None = None, timeout: float = 300, process: bool | None = None,
              **kw) -> subprocess.CompletedProcess:
    """`python train.py FLAGS`: (returncode, stdout, stderr) as a CompletedProcess.

    A run on one process runs here, in this interpreter (train.py's own main through run_cli, stdout
    and stderr captured, env set for the run, one torch thread as a process gets): that saves the
    ~5 s of a fresh interpreter importing Lightning. A DeepSpeed run on several processes, a call with
    subprocess keywords, or process=True (where the test is about the process: its exit, its noise)
    starts a real `python train.py`."""
    if process is None:
        process = bool(kw) or _launches_processes(flags)
    if not process:
        return _train_here(flags, env or {})
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, TRAIN, *flags], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO, **kw)


def _launches_processes(flags: list[str]) -> bool:
    value = {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f.startswith("--")}
    return value.get("--devices", "1") != "1" or "deepspeed" in value.get("--strategy", "")


def _train_here(flags: list[str], env: dict) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import random
    import traceback

    from rwkv_bone.cli import run_cli
    from rwkv_bone.cli.train import main

    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(REPO)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(lambda: main(list(flags)))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what a process would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
    return subprocess.CompletedProcess([TRAIN, *flags], code, out.getvalue(), err.getvalue())

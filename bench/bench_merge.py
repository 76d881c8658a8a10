"""Merge and dry-run cost at real sizes, side by side with the I/O floor (a plain mmap load + save).

    python bench/bench_merge.py --n_layer 24 --n_embd 2048 [--vocab 65536] [--dir /tmp] [--bone_b 64]

Writes a random-weight bf16 checkpoint in the official layout (the keys and shapes
RWKV6Config.expected_shapes gives, i.e. what rwkv_bone's model saves; values N(0, 0.02), which is
all a merge's cost depends on; written through a file-backed scratch, not memory) and a Bone-row adapter on every default target, in a temporary
folder under --dir (outside the repository), then runs each case in a fresh subprocess:
  copy        torch.load(mmap=True) + torch.save: the floor a merge cannot beat
  copy_fsync  the same, then fsync (a merge's atomic write waits for the disk; the copy does not)
  old_merge   load_state_dict + merge_state_dict + first_non_finite + torch.save (merge.py today)
  streamed    rwkv_bone.merging.merge_checkpoint to .pth, and to .safetensors (streamed_st)
  merge_only  the adapter arithmetic alone (registry merged() for every adapted weight, no output)
  read_config rwkv_bone.checkpoint.read_config: the shapes-only read a dry run does
  old_dry     the former dry run: load_state_dict (values checked) + config from it
  dry_run     train.run(--load_model BASE --dry_run): shapes only
Reported per case: wall seconds of the subprocess (Python + torch start-up included), inner_s (the
case alone, after `import torch`; the rwkv_bone / lightning imports it needs are inside), and peak
anonymous memory (RssAnon sampled every 10 ms from the parent). Before each case (not timed) os.sync()
writes back what the previous one left dirty. Everything written is deleted at the end.

Measured at L24 C2048 (2.98 GiB, bench/results/bench_merge_1.6b.txt; 2 shared cores, noisy): copy
10.0-10.4 s / 0.14 GB; streamed .pth 9.8-11.7 s (1.0-1.2x the copy) / 0.35 GB (0.12x the checkpoint),
.safetensors 9.6 s; the Bone arithmetic alone (merge_only) 4.3 s (13 s before the chunked merge;
the old in-memory merge took 25-31 s / 4.1 GB). At L32 C4096 (14.1 GiB, bench_merge_7b.txt, three
runs): copy 24.5-32.2 s, copy_fsync 25.7-28.7 s, streamed .pth 36.6-39.5 s = 1.23-1.44x the copy of
the same run (1.32x with OMP_NUM_THREADS=2) / 0.68-0.77 GB (0.05x), .safetensors 39.5 s; at this size
the float32 Bone products (2 b flops per weight) are what the merge adds to the copy. Dry run 5-9 s /
0.28 GB of which read_config is 0.08 s (Python, torch, Lightning start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(path: str, n_layer: int, n_embd: int, vocab: int) -> None:
    """torch.save of every tensor of the official layout, each held in its own slice of a scratch
    file (np.memmap: file-backed pages, so a 15 GB checkpoint does not need 15 GB of memory),
    filled from one random bf16 block at a different offset per tensor."""
    import numpy as np
    import torch

    from rwkv_bone.config import RWKV6Config

    g = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 24, generator=g) * 0.02).bfloat16().view(torch.int16).numpy()
    shapes = RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab).expected_shapes()
    scratch = path + ".scratch"
    total = sum(int(np.prod(s)) for s in shapes.values()) * 2
    with open(scratch, "wb") as f:
        f.truncate(total)
    sd, offset = {}, 0
    for i, (k, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape))
        m = np.memmap(scratch, dtype=np.int16, mode="r+", offset=offset, shape=(n,))
        j, start = 0, (i * 7919) % block.size
        while j < n:                                  # block[start:], then from its beginning
            part = m[j:j + block.size - start]
            part[:] = block[start:start + part.size]
            j, start = j + part.size, 0
        sd[k] = torch.from_numpy(m).view(torch.bfloat16).view(shape)
        offset += n * 2
    torch.save(sd, path)
    del sd
    os.remove(scratch)
def bone_adapter(base: str, bone_b: int):
    """A Bone-row adapter (in-memory AdapterFile) on every default target of `base`, non-zero."""
    import torch

    from rwkv_bone.checkpoint import read_shapes
    from rwkv_bone.peft.formats.common import AdapterFile
    from rwkv_bone.peft.inject import DEFAULT_TARGETS
    from rwkv_bone.peft.registry import get_method

    method = get_method("bone")
    meta = dict(method="bone", targets=list(DEFAULT_TARGETS), train_parts=[], **method.settings({"bone_b": bone_b}))
    shapes = read_shapes(base)
    g = torch.Generator().manual_seed(1)
    layers = {}
    for key, shape in shapes.items():
        name = key[:-len(".weight")]
        if key.endswith(".weight") and name.split(".", 2)[-1] in DEFAULT_TARGETS and name.startswith("blocks."):
            layers[name] = {k: torch.randn(s, generator=g) * 0.01
                            for k, s in method.layer_shapes(meta, *shape).items()}
    return AdapterFile(path="bench-bone", meta=meta, layers=layers)


def worker(case: str, base: str, out: str, bone_b: int) -> None:
    import torch

    t0 = time.perf_counter()
    _case(case, base, out, bone_b)
    print(json.dumps({"inner_s": round(time.perf_counter() - t0, 2)}))


def _case(case: str, base: str, out: str, bone_b: int) -> None:
    """The measured operation (imports of rwkv_bone / lightning included where the case needs them)."""
    import torch

    if case == "copy":
        torch.save(torch.load(base, mmap=True, weights_only=True), out)
    elif case == "copy_fsync":   # the same, then waiting for the disk as an atomic write does
        torch.save(torch.load(base, mmap=True, weights_only=True), out)
        with open(out, "rb") as f:
            os.fsync(f.fileno())
    elif case == "old_merge":
        from rwkv_bone.checkpoint import first_non_finite, load_state_dict
        from rwkv_bone.atomic import torch_save_atomic
        from rwkv_bone.peft.adapter_io import merge_state_dict

        merged = merge_state_dict(load_state_dict(base), bone_adapter(base, bone_b))
        assert first_non_finite(merged) is None
        torch_save_atomic(merged, out)
    elif case in ("streamed", "streamed_st"):
        from rwkv_bone.merging import merge_checkpoint

        merge_checkpoint(base, [bone_adapter(base, bone_b)], out)
    elif case == "merge_only":   # the adapter arithmetic alone: every merged weight, nothing written
        from rwkv_bone.checkpoint import load_state_dict
        from rwkv_bone.merging import plan_merge

        for r in plan_merge(load_state_dict(base, check_finite=False), [bone_adapter(base, bone_b)]).values():
            if r.ops:
                r.materialise()
    elif case == "read_config":
        from rwkv_bone.checkpoint import read_config

        print(read_config(base))
    elif case == "old_dry":
        from rwkv_bone.checkpoint import load_state_dict
        from rwkv_bone.config import RWKV6Config
        from rwkv_bone.model import RWKV6

        config = RWKV6Config.from_state_dict(load_state_dict(base))
        print(sum(p.numel() for p in RWKV6.from_config(config, device="meta").parameters()))
    elif case == "dry_run":
        from rwkv_bone.train.args import parse_args
        from rwkv_bone.train.run import run

        run(parse_args(["--load_model", base, "--peft", "none", "--dry_run"]))


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(case: str, base: str, out: str, bone_b: int) -> dict:
    os.sync()   # not timed: no case pays for the writeback of what the one before it wrote
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--worker", case, "--base", base, "--out", out,
                          "--bone_b", str(bone_b)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, rss_anon_kb(p.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    log = p.stdout.read()
    if p.returncode:
        raise RuntimeError(f"{case} failed:\n{log}")
    size = os.path.getsize(out) if os.path.exists(out) else 0
    if os.path.exists(out):
        os.remove(out)
    inner = json.loads(log.strip().splitlines()[-1])["inner_s"]
    return dict(case=case, wall_s=round(wall, 2), inner_s=inner, peak_anon_gb=round(peak / 2**20, 3), output_gb=round(size / 2**30, 3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n_layer", type=int, default=24)
    ap.add_argument("--n_embd", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--bone_b", type=int, default=64)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary files go (not the repo)")
    ap.add_argument("--cases", default="copy,old_merge,streamed,streamed_st,merge_only,old_dry,read_config,dry_run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.base, a.out, a.bone_b)
        return 0
    d = tempfile.mkdtemp(prefix="bench_merge_", dir=a.dir)
    try:
        base = os.path.join(d, "base.pth")
        t0 = time.perf_counter()
        make_checkpoint(base, a.n_layer, a.n_embd, a.vocab)
        print(f"checkpoint L{a.n_layer} C{a.n_embd} V{a.vocab}: {os.path.getsize(base) / 2**30:.2f} GiB bf16, "
              f"written in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for case in a.cases.split(","):
            out = os.path.join(d, "out.safetensors" if case == "streamed_st" else "out.pth")
            rows.append(measure(case, base, out, a.bone_b))
            print(json.dumps(rows[-1]), flush=True)
        floor = next((r for r in rows if r["case"] == "copy"), None)
        if floor:
            for r in rows:
                print(f"{r['case']:12s} {r['wall_s']:7.2f} s ({r['wall_s'] / floor['wall_s']:.2f}x copy, inner {r['inner_s']:.2f} s)  "
                      f"peak anon {r['peak_anon_gb']:.3f} GB ({r['peak_anon_gb'] * 2**30 / os.path.getsize(base):.3f}x ckpt)")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of one infctx training step against ctx_len (CPU): bounded by one chunk.

    python bench/bench_infctx.py --ctx 512,1024,2048,4096,8192,16384 --chunk_ctx 512 \\
        --n_layer 4 --n_embd 256 --vocab 4096 --plain_max 4096

Every point runs in a fresh subprocess (so one point's peak never hides another's): build a
random RWKV-6 (the reference init, fp32) with Bone-row b=64, then one training step of batch 1 on
ctx_len random tokens: infctx_loss (rwkv_bone.train.infctx) with --chunk_ctx, backward, AdamW.
Reported: the process's peak RSS (ru_maxrss, which includes Python, torch and the model), the RSS
after the model is built, and the step's own peak (the difference). With --plain_max, points up to
that ctx_len also run the plain path (the whole sample at once, chunked cross-entropy) for contrast.
Goal (issue 10): peak at ctx 16384 within 1.5x of the peak at ctx 512.

glibc's malloc raises its mmap threshold after large frees, so the chunk-sized buffers freed after
each chunk then stay in the heap behind the few small tensors each chunk keeps (the carried state)
and RSS grows with the number of chunks although live memory does not. The workers therefore run
with MALLOC_MMAP_THRESHOLD_=65536 by default (--mmap_threshold 0: glibc's default behaviour), which
is what the (CUDA caching) allocator of a GPU run does anyway: reuse freed blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(a: argparse.Namespace) -> dict:
    import torch

    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft
    from rwkv_bone.train.infctx import infctx_loss
    from rwkv_bone.train.loss import chunked_token_loss

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=a.n_layer, n_embd=a.n_embd, vocab_size=a.vocab))
    apply_peft(model, "bone", bone_b=64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, a.vocab, (1, a.ctx_len))
    y = torch.randint(0, a.vocab, (1, a.ctx_len))
    built = _rss_mb()
    t0 = time.perf_counter()
    if a.mode == "infctx":
        loss = infctx_loss(model, x, y, None, a.chunk_ctx)
    else:
        loss = chunked_token_loss(model.head, model.forward_features(x)[0], y)
    loss.backward()
    opt.step()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ctx_len": a.ctx_len, "mode": a.mode, "peak_mb": peak, "built_mb": built,
            "step_mb": peak - built, "seconds": secs, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", default="512,1024,2048,4096,8192,16384", help="ctx_len values")
    p.add_argument("--chunk_ctx", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plain_max", type=int, default=0, help="also run the plain path up to this ctx_len")
    p.add_argument("--mmap_threshold", type=int, default=65536,
                   help="MALLOC_MMAP_THRESHOLD_ for the workers (0 = leave glibc's dynamic threshold)")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ctx_len", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="infctx", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    common = ["--chunk_ctx", str(a.chunk_ctx), "--n_layer", str(a.n_layer), "--n_embd", str(a.n_embd),
              "--vocab", str(a.vocab), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    rows = []
    print(f"RWKV-6 L{a.n_layer} C{a.n_embd} V{a.vocab}, Bone-row b=64, batch 1, chunk_ctx {a.chunk_ctx}, "
          f"CPU fp32, MALLOC_MMAP_THRESHOLD_={a.mmap_threshold or 'glibc default'}")
    print(f"{'ctx_len':>8} {'mode':>7} {'peak RSS MB':>12} {'after build':>12} {'step MB':>9} {'s':>7}")
    for ctx in (int(c) for c in a.ctx.split(",")):
        for mode in ("infctx", "plain"):
            if mode == "plain" and ctx > a.plain_max:
                continue
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--ctx_len", str(ctx),
                                  "--mode", mode, *common], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"error: the ctx_len {ctx} {mode} worker failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{ctx:>8} {mode:>7} {r['peak_mb']:>12.0f} {r['built_mb']:>12.0f} {r['step_mb']:>9.0f} "
                  f"{r['seconds']:>7.1f}", flush=True)
    inf = [r for r in rows if r["mode"] == "infctx"]
    if len(inf) > 1:
        lo, hi = inf[0], inf[-1]
        print(f"infctx peak RSS at ctx {hi['ctx_len']} / at ctx {lo['ctx_len']}: "
              f"{hi['peak_mb'] / lo['peak_mb']:.2f}x (step's own: {hi['step_mb'] / max(lo['step_mb'], 1e-9):.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

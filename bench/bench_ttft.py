"""Time to first token of generate/eval, side by side with its floor: an mmap load plus one prompt
forward.

    python bench/bench_ttft.py [--n_layer 24 --n_embd 2048 --vocab 65536 --dtype fp32,bf16
                                --prompt 32 --repeats 2 --dir /tmp]

Writes a random-weight bf16 checkpoint in the official layout (bench_merge.make_checkpoint; 3.2 GB at
L24 C2048) under --dir, reads it once so every case starts from a warm page cache, then runs each
case in a fresh subprocess (inner seconds after `import torch`, best of --repeats):
  floor   torch.load(mmap=True) + each tensor .to(dtype) (nothing for bf16) + an RWKV6 built on
          them (load_state_dict(assign=True)) + forward_with_state on the prompt: the floor
  ours    rwkv_bone.loading.load_model(path, dtype) + rwkv_bone.decode.feed(prompt): what
          generate.py and eval.py at --batch_size 1 do before their first token
  packed  the same with load_model(..., pack=True), as eval.py loads for batches: for bf16 the
          weights are packed into new memory (for fp32 it is "ours" again: packed either way)
The checkpoint is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


CASES = {"fp32": ("floor", "ours"), "bf16": ("floor", "ours", "packed")}


def worker(case: str, path: str, dtype_name: str, prompt_len: int, vocab: int) -> None:
    import torch

    from rwkv_bone.loading import DTYPES

    dtype = DTYPES[dtype_name]
    prompt = [1 + (i * 7919) % (vocab - 1) for i in range(prompt_len)]
    t0 = time.perf_counter()
    if case == "floor":
        from rwkv_bone.config import RWKV6Config
        from rwkv_bone.model import RWKV6

        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        sd = {k: v.to(dtype) for k, v in sd.items()}
        with torch.device("meta"):
            model = RWKV6(RWKV6Config.from_state_dict(sd))
        model.load_state_dict(sd, assign=True)
        t1 = time.perf_counter()
        with torch.no_grad():
            logits, _ = model.forward_with_state(torch.tensor([prompt]))
    else:
        from rwkv_bone.decode import feed
        from rwkv_bone.loading import load_model

        model = load_model(path, dtype=dtype, pack=True if case == "packed" else None)
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits, _ = feed(model, prompt)
    t2 = time.perf_counter()
    print(json.dumps({"inner_s": round(t2 - t0, 3), "load_s": round(t1 - t0, 3), "forward_s": round(t2 - t1, 3)}))


def measure(case: str, path: str, dtype: str, prompt_len: int, vocab: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", case, "--path", path, "--dtype", dtype,
                          "--prompt", str(prompt_len), "--vocab", str(vocab)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=24)
    ap.add_argument("--n_embd", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="folder for the checkpoint (default: the temp dir)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.path, args.dtype, args.prompt, args.vocab)
        return
    from bench_merge import make_checkpoint

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "base.pth")
        t = time.perf_counter()
        make_checkpoint(path, args.n_layer, args.n_embd, args.vocab)
        gib = os.path.getsize(path) / 2**30
        print(f"checkpoint L{args.n_layer} C{args.n_embd} V{args.vocab}: {gib:.2f} GiB bf16, written in "
              f"{time.perf_counter() - t:.1f} s; prompt {args.prompt} tokens; best of {args.repeats}", flush=True)
        with open(path, "rb") as f:  # warm page cache for every case
            while f.read(1 << 26):
                pass
        for dtype in args.dtype.split(","):
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for case in CASES[dtype]:
                    r = measure(case, path, dtype, args.prompt, args.vocab)
                    print(json.dumps({"dtype": dtype, "case": case, **r}), flush=True)
                    if case not in best or r["inner_s"] < best[case]["inner_s"]:
                        best[case] = r
            for case in CASES[dtype]:
                r = best[case]
                print(f"{dtype:5s} {case:6s} {r['inner_s']:7.2f} s ({r['inner_s'] / best['floor']['inner_s']:.2f}x "
                      f"floor; load {r['load_s']:.2f} s + prompt forward {r['forward_s']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()

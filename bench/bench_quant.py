"""Frozen-weight memory and training-step time with the base in bf16, nf4 or int8, side by side.

    python bench/bench_quant.py --quants none,nf4,int8 --n_layer 8 --n_embd 1024 --vocab 4096 \\
        --ctx_len 128 --steps 3 --methods bone,lora

Every (method, quant) point runs in a fresh subprocess: build a random RWKV-6 (the reference
init), apply the adapter (Bone-row b=64 or LoRA r=32), quantise its frozen linears (--quant, as
train.py does), cast frozen tensors to bf16 (cast_for_training), then --steps training steps of
batch 1 under bf16 autocast (chunked cross-entropy, backward, AdamW); the first step is a warm-up.
Reported: frozen weight bytes (rwkv_bone.quant.frozen_weight_bytes, the figure train.py prints),
the worker's RSS once the model is built and its peak RSS during the steps (VmHWM reset after the
build, so the fp32 model the bench builds before quantising is not counted; both include Python
and torch; workers run with MALLOC_MMAP_THRESHOLD_=65536 so freed memory leaves the RSS), median
step seconds, and ratios to the bf16 base of the same method. `--device cuda`: peak
torch.cuda.max_memory_allocated instead.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); ignored where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(a: argparse.Namespace) -> dict:
    import torch

    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft
    from rwkv_bone.peft.inject import quantize_frozen
    from rwkv_bone.quant import frozen_weight_bytes
    from rwkv_bone.train.loss import chunked_token_loss
    from rwkv_bone.train.run import cast_for_training

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=a.n_layer, n_embd=a.n_embd, vocab_size=a.vocab))
    with torch.no_grad():  # the reference init zeroes some linears: give every matmul real values
        for n, p in model.named_parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    apply_peft(model, a.method, bone_b=64, lora_r=32)
    if a.quant != "none":
        quantize_frozen(model, a.quant)
    cast_for_training(model, bf16=True)
    frozen, kinds = frozen_weight_bytes(model)
    model.to(a.device)
    gc.collect()
    built = _rss_mb()
    _reset_peak_rss()  # the fp32 build before quantisation is not part of training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(a.steps):
        x = torch.randint(0, a.vocab, (1, a.ctx_len), generator=g).to(a.device)
        y = torch.randint(0, a.vocab, (1, a.ctx_len), generator=g).to(a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16):
            loss = chunked_token_loss(model.head, model.forward_features(x)[0], y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else _rss_mb("VmHWM")
    return {"method": a.method, "quant": a.quant, "frozen_mb": frozen / 2**20, "kinds": kinds,
            "built_mb": built, "peak_mb": peak, "step_s": statistics.median(times[1:] or times), "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quants", default="none,nf4,int8", help="none (bf16 base), nf4, fp4, int8")
    p.add_argument("--methods", default="bone,lora")
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ctx_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="bone", help=argparse.SUPPRESS)
    p.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    common = ["--n_layer", str(a.n_layer), "--n_embd", str(a.n_embd), "--vocab", str(a.vocab),
              "--ctx_len", str(a.ctx_len), "--steps", str(a.steps), "--threads", str(a.threads),
              "--device", a.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MALLOC_MMAP_THRESHOLD_="65536")
    print(f"RWKV-6 L{a.n_layer} C{a.n_embd} V{a.vocab}, batch 1, ctx {a.ctx_len}, bf16 autocast, {a.device}")
    print(f"{'method':>6} {'base':>5} {'frozen MB':>10} {'x bf16':>7} {'built MB':>9} {'peak MB':>8} "
          f"{'step s':>7} {'x bf16':>7}")
    rows = []
    for method in a.methods.split(","):
        ref = None
        for quant in a.quants.split(","):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--method", method,
                                  "--quant", quant, *common], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"error: the {method} {quant} worker failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            ref = ref or r
            print(f"{method:>6} {quant if quant != 'none' else 'bf16':>5} {r['frozen_mb']:>10.1f} "
                  f"{r['frozen_mb'] / ref['frozen_mb']:>7.3f} {r['built_mb']:>9.0f} {r['peak_mb']:>8.0f} {r['step_s']:>7.2f} "
                  f"{r['step_s'] / ref['step_s']:>7.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

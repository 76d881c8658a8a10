"""The few-row CPU decode kernel (rwkv_bone/gemv) against torch's matmul, side by side in one run:
GB/s of weight read for y = x W^T over one model's worth of decode-step weight shapes, at each
batch size, for fp32 and bf16, each twice: W row-major, and W packed in panels, the layout
load_model gives a decode model (rwkv_bone/gemv/packed.py); with --sweep, every block height R the kernel has for each batch
(the table RB_ROWS in gemv.c was chosen from this). Beside each kernel figure: its GFLOP/s (2 B
flops per weight read) and their share of the cores' own ceiling, measured first in the same run
with bench/fma_peak.c (independent 512-bit FMA / vdpbf16ps chains on every thread, no memory):
where the share is high, more rows per step cannot come faster from any kernel layout.

    python bench/bench_gemv.py [--n_embd 2048 --n_ffn 7168 --layers 6 --batches 1,2,4,8,16
                                --dtype fp32,bf16 --repeats 5 --sweep]

Per layer the weights are six C x C (receptance, key, value, gate, output, ffn receptance), one
F x C (ffn key) and one C x F (ffn value): at C 2048 and --layers 6, 1.4 GB of fp32, far more than
the caches, so every product streams its weight from memory. Each figure is the best of --repeats
passes over all of them (the machine is shared; the best pass is the least disturbed one).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone import gemv, native  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEIGHTS = (1, 2, 3, 4)


def best_gbs(fn, nbytes: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def peak_gflops(name: str, threads: int, repeats: int) -> float:
    """The cores' fp32 FMA (or bf16 dot-product) ceiling in GFLOP/s, best of `repeats` (fma_peak.c)."""
    lib = ctypes.CDLL(str(native.build(Path(__file__).with_name("fma_peak.c"), gemv.CFLAGS)))
    fn = lib.rb_peak_bf16 if name == "bf16" else lib.rb_peak_f32
    fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_int], ctypes.c_double
    fn(1 << 20, threads)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        flops = fn(1 << 25, threads)
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_embd", type=int, default=2048)
    ap.add_argument("--n_ffn", type=int, default=7168)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time every block height R per batch")
    args = ap.parse_args()
    if not gemv.available():
        sys.exit("bench_gemv: the kernel is not available on this machine (see the warning above)")
    lib = gemv._library()
    threads = torch.get_num_threads()
    C, F = args.n_embd, args.n_ffn
    shapes = [(C, C)] * 6 + [(F, C), (C, F)]
    print(f"{args.layers} layers of C{C} F{F} weights, CPU, {threads} threads, best of {args.repeats}; GB/s of weight read")
    for name in args.dtype.split(","):
        dtype = DTYPES[name]
        bf16 = int(dtype == torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(*s, generator=g).to(dtype) for _ in range(args.layers) for s in shapes]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        peak = peak_gflops(name, threads, args.repeats)
        print(f"{name}: {nbytes / 1e9:.2f} GB; the cores' ceiling {peak:.0f} GFLOP/s (fma_peak.c)")
        for B in (int(b) for b in args.batches.split(",")):
            xs = {K: torch.randn(B, K, generator=g).to(dtype) for K in (C, F)}
            torch_gbs = best_gbs(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in ws], nbytes, args.repeats)
            kernel = (lambda: [gemv._run(lib, xs[w.shape[1]], w, threads) for w in ws]) if B <= gemv.MAX_ROWS else None
            line = f"  B {B:2d}: torch {torch_gbs:5.1f}"
            if kernel is not None:
                k_gbs = best_gbs(kernel, nbytes, args.repeats)
                gflops = k_gbs / dtype.itemsize * 2 * B
                line += f"   kernel {k_gbs:5.1f}  ({k_gbs / torch_gbs:.2f}x; {gflops:4.0f} GFLOP/s, {gflops / peak:4.0%} of the ceiling)"
            if kernel is not None:  # the weights as load_model ships them: packed
                packed = [(gemv.pack(w), w.shape[0]) for w in ws]
                p_gbs = best_gbs(lambda: [gemv._run_packed(lib, xs[p.numel() // n], p, n, threads) for p, n in packed],
                                 nbytes, args.repeats)
                gflops = p_gbs / dtype.itemsize * 2 * B
                line += f"   packed {p_gbs:5.1f}  ({p_gbs / torch_gbs:.2f}x; {gflops:4.0f} GFLOP/s, {gflops / peak:4.0%})"
                del packed
            if args.sweep and kernel is not None:
                nb = min(B, 8)
                shipped = lib.rb_gemv_get_rows(bf16, nb)
                chosen = [r for r in HEIGHTS if lib.rb_gemv_set_rows(bf16, nb, r)]
                sweep = []
                for r in chosen:
                    lib.rb_gemv_set_rows(bf16, nb, r)
                    sweep.append(f"R{r} {best_gbs(kernel, nbytes, args.repeats):.1f}")
                lib.rb_gemv_set_rows(bf16, nb, shipped)
                line += f"   sweep (R{shipped} shipped): " + " | ".join(sweep)
            print(line, flush=True)
        del ws


if __name__ == "__main__":
    main()

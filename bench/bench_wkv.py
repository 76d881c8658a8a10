"""Benchmark the WKV6 paths, forward + backward, side by side in one run.

CPU (default): the chunked PyTorch path (what `wkv6` runs on CPU) against the per-token reference
loop, B=1, H=32, N=64, T=512 float32 by default; prints both times and the ratio (goal >= 20x).
--cuda: on a GPU, the CUDA kernel against the chunked path on the same GPU (float32 and bf16).

    python bench/bench_wkv.py [--T 512] [--H 32] [--B 1] [--repeats 3] [--threads 0]
    python bench/bench_wkv.py --cuda [--B 8] [--T 1024]
"""
from __future__ import annotations

import argparse
import time

import torch

from rwkv_bone.wkv import wkv6_chunked, wkv6_reference
from rwkv_bone.wkv.cuda import cuda_kernel_available, wkv6_cuda


def make_inputs(B, T, H, N, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -6.0 + 7.0 * torch.rand(B, T, H, N, generator=g)  # decays from ~1 down to exp(-e)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g)
    out = [x.to(device=device, dtype=dtype) for x in (r, k, v)]
    return out + [x.to(device) for x in (w, u, state)]


def run_fwd_bwd(fn, inputs, sync=lambda: None) -> tuple[float, float, list]:
    """One forward + backward: (wall seconds, process CPU seconds, [y, state, grads...])."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    y, s = fn(*leaves)
    (y.float().square().sum() + s.float().square().sum()).backward()
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, [y, s] + [x.grad for x in leaves]


def time_side_by_side(fns: dict, inputs, repeats: int, sync=lambda: None):
    """Interleave the candidates (one warm-up each) so they share the machine's load; report the
    best wall and the best CPU time of each and the outputs of its last run."""
    best = {name: [float("inf"), float("inf"), None] for name in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            wall, cpu, out = run_fwd_bwd(fn, inputs, sync)
            if i > 0:
                best[name][0] = min(best[name][0], wall)
                best[name][1] = min(best[name][1], cpu)
            best[name][2] = out
    return best


def max_rel_diff(a: list, b: list) -> float:
    return max(
        (x.double() - y.double()).abs().max().item() / max(1.0, y.double().abs().max().item())
        for x, y in zip(a, b)
    )


def bench_cpu(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs(args.B, args.T, args.H, args.N)
    res = time_side_by_side(
        {"chunked": wkv6_chunked, "reference": wkv6_reference}, inputs, args.repeats
    )
    (fw, fc, fout), (rw, rc, rout) = res["chunked"], res["reference"]
    print(f"WKV6 forward+backward, B={args.B} T={args.T} H={args.H} N={args.N} float32, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats}")
    print(f"  {'':22s} {'wall ms':>10s} {'CPU ms':>10s}")
    print(f"  {'chunked (wkv6 on CPU)':22s} {fw * 1e3:10.1f} {fc * 1e3:10.1f}")
    print(f"  {'reference loop':22s} {rw * 1e3:10.1f} {rc * 1e3:10.1f}")
    print(f"  {'speed-up':22s} {rw / fw:9.1f}x {rc / fc:9.1f}x   "
          f"(max rel. difference {max_rel_diff(fout, rout):.1e})")


def bench_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU")
    if not cuda_kernel_available(args.N):
        raise SystemExit(f"the CUDA kernel is not available for head size {args.N}")
    sync = torch.cuda.synchronize
    print(f"WKV6 forward+backward on {torch.cuda.get_device_name()}, "
          f"B={args.B} T={args.T} H={args.H} N={args.N}, best of {args.repeats}")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(args.B, args.T, args.H, args.N, "cuda", dtype)
        res = time_side_by_side(
            {"kernel": wkv6_cuda, "chunked": wkv6_chunked}, inputs, args.repeats, sync
        )
        (kw, _, kout), (cw, _, cout) = res["kernel"], res["chunked"]
        print(f"  {str(dtype):15s} CUDA kernel {kw * 1e3:8.2f} ms | chunked {cw * 1e3:8.2f} ms | "
              f"kernel {cw / kw:5.1f}x faster (max rel. difference {max_rel_diff(kout, cout):.1e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true", help="time the CUDA kernel vs chunked on GPU")
    p.add_argument("--B", type=int, default=None, help="batch (default 1 on CPU, 8 with --cuda)")
    p.add_argument("--T", type=int, default=None, help="length (default 512, 1024 with --cuda)")
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    args.B = args.B or (8 if args.cuda else 1)
    args.T = args.T or (1024 if args.cuda else 512)
    bench_cuda(args) if args.cuda else bench_cpu(args)


if __name__ == "__main__":
    main()

"""Tokens/s of a small RWKV-6 forward and forward+backward on the current device (CPU by default).

    .venv/bin/python bench/bench_model.py [--n_layer 4 --n_embd 256 --vocab 65536 --ctx 512 --batch 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--grad_cp", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab)
    model = RWKV6.from_config(cfg, device=args.device, dtype=dtype)
    model.grad_cp = args.grad_cp
    idx = torch.randint(0, args.vocab, (args.batch, args.ctx), device=args.device)
    tokens = args.batch * args.ctx

    def fwd() -> None:
        with torch.no_grad():
            model(idx)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()

    model.eval()
    t_f = timed(fwd, 1, args.iters)
    model.train()
    t_fb = timed(fwd_bwd, 1, args.iters)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"RWKV-6 L={cfg.n_layer} C={cfg.n_embd} V={cfg.vocab_size} ({n_params / 1e6:.1f}M params) "
        f"B={args.batch} T={args.ctx} {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
        f"grad_cp={args.grad_cp}"
    )
    print(f"forward          {t_f * 1e3:9.1f} ms/step  {tokens / t_f:10.0f} tokens/s")
    print(f"forward+backward {t_fb * 1e3:9.1f} ms/step  {tokens / t_fb:10.0f} tokens/s")


if __name__ == "__main__":
    main()

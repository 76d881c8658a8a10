"""Greedy decoding tokens/s, side by side in one run on one model: the official `rwkv` package's
one-token path, ours at batch 1, ours at batch 16 (rwkv_bone.decode.greedy_batch, RWKV6.step).

    python bench/bench_eval.py [--n_layer 12 --n_embd 768 --vocab 65536 --tokens 64 --batch 16]

The model has random weights (speed does not depend on them), fp32 on the CPU. Each path decodes
--tokens new tokens after a short prompt; ours include the prompt prefill in their time (the
package's prefill is not timed), so the ratios are if anything conservative.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.decode import greedy_batch  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402


def official_tokens_per_s(path: str, prompt: list[int], n: int) -> float:
    for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[var] = "0"
    from rwkv.model import RWKV

    model = RWKV(model=path, strategy="cpu fp32", verbose=False)
    with torch.no_grad():
        logits, state = model.forward(prompt, None)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, state = model.forward([int(torch.argmax(logits))], state)
        return n / (time.perf_counter() - t0)


def ours_tokens_per_s(model: RWKV6, prompts: list[list[int]], n: int, batch: int) -> float:
    made = [0]
    t0 = time.perf_counter()
    greedy_batch(model, prompts, n, batch_size=batch, on_step=lambda k, _: made.__setitem__(0, made[0] + k))
    return made[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab))
    with torch.no_grad():  # the reference init zeroes some projections; random ones vary the tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (4 + i % 5,), generator=g).tolist() for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.pth")
        model.save_checkpoint(path)
        ours_tokens_per_s(model, prompts[:1], 4, 1)  # warm-up
        pkg = official_tokens_per_s(path, prompts[0], args.tokens)
    one = ours_tokens_per_s(model, prompts[:1], args.tokens, 1)
    many = ours_tokens_per_s(model, prompts, args.tokens, args.batch)
    print(f"RWKV-6 L{args.n_layer} C{args.n_embd} V{args.vocab}, fp32 CPU, {torch.get_num_threads()} threads, "
          f"{args.tokens} new tokens per prompt")
    print(f"{'path':34s} {'tokens/s':>10s} {'vs package':>11s}")
    print(f"{'rwkv package (one-token forward)':34s} {pkg:10.1f} {1.0:10.2f}x")
    print(f"{'ours, batch 1':34s} {one:10.1f} {one / pkg:10.2f}x")
    print(f"{f'ours, batch {args.batch}':34s} {many:10.1f} {many / pkg:10.2f}x")


if __name__ == "__main__":
    main()

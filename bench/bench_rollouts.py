"""GRPO rollout throughput and one GRPO step's cost, side by side in one run on one model.

    python bench/bench_rollouts.py [--n_layer 2 --n_embd 256 --vocab 65536 --prompts 4 --G 8 --tokens 64]

Compares completion tokens/s of rwkv_bone.decode.sample_batch at prompts x G rows (each prompt
prefilled once, its state repeated G times) with eval.py's greedy_batch at batch 16 on the same
number of rows, then times one GRPO micro-batch (rollouts + the completion forward/backward,
Bone b=64 adapters, --grpo_beta 0.04 so the reference pass is included) and reports its peak RSS.
Random weights with a fixed seed and no end-of-document token allowed, so every row runs the full
--tokens (speed does not depend on the values). fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.decode import greedy_batch, sample_batch  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=a.n_layer, n_embd=a.n_embd, vocab_size=a.vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.head.weight[0].fill_(-1.0)  # discourage token 0 so rows run their full length
    model.eval()
    prompts = [[(7 * i + j) % (a.vocab - 1) + 1 for j in range(24)] for i in range(a.prompts)]
    rows = a.prompts * a.G

    t0 = time.perf_counter()
    out = sample_batch(model, prompts, a.G, a.tokens, generator=torch.Generator().manual_seed(0))
    t_sample = time.perf_counter() - t0
    sampled = sum(len(r.tokens) for g in out for r in g)

    repeated = [p for p in prompts for _ in range(a.G)]
    made = [0]
    t0 = time.perf_counter()
    greedy_batch(model, repeated, a.tokens, batch_size=16, on_step=lambda k, _: made.__setitem__(0, made[0] + k))
    t_greedy = time.perf_counter() - t0

    from rwkv_bone.peft import apply_peft
    from rwkv_bone.train.objectives.grpo import GRPOSettings, grpo_batch_loss
    from rwkv_bone.train.objectives.reference import InitialWeights

    apply_peft(model, "bone", bone_b=64)
    model.train()
    ref = InitialWeights(model)
    s = GRPOSettings(num_generations=a.G, max_new_tokens=a.tokens, beta=0.04)
    reward = lambda i, toks: float(sum(toks) % 2)  # noqa: E731  (any 0/1 reward: the cost is the same)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    loss, m = grpo_batch_loss(model, ref, prompts, reward, s, torch.Generator().manual_seed(1))
    loss.backward()
    t_step = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"model L{a.n_layer} C{a.n_embd} V{a.vocab} fp32, {torch.get_num_threads()} threads; "
          f"{a.prompts} prompts x G={a.G} = {rows} rows x {a.tokens} new tokens")
    print(f"sample_batch ({rows} rows at once, prefill once per prompt): {sampled / t_sample:.1f} completion tok/s "
          f"({t_sample:.2f} s)")
    print(f"greedy_batch batch 16 (eval.py's decode, every row prefilled): {made[0] / t_greedy:.1f} tok/s "
          f"({t_greedy:.2f} s)  -> rollouts {(sampled / t_sample) / (made[0] / t_greedy):.2f}x")
    print(f"one GRPO micro-batch (rollouts + reference + forward/backward, Bone b=64): {t_step:.2f} s; "
          f"peak RSS {rss1:.0f} MB (before the step {rss0:.0f} MB); completion_tokens {m['completion_tokens']:.1f}")


if __name__ == "__main__":
    main()

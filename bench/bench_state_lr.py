"""Which --lr_init suits state tuning (--peft state)? Loss after a fixed number of AdamW steps
(train.py's optimizer settings: betas 0.9/0.99, eps 1e-8, gradient clipping 1.0), per learning rate,
side by side on one small model and one task.

    python bench/bench_state_lr.py [--steps 60] [--lrs 1e-4,1e-3,1e-2,1e-1,1] [--threads 2]

Model: RWKV-6 L=2 C=128 (H=2, N=64) V=256 with the reference init and its linears then drawn at
random (std 1/sqrt(in)), so that the initial state reaches the logits. Task: sequences of 64
tokens where every sequence continues one fixed 8-token phrase, which the base cannot know: the
learned initial state acts as a soft prompt (what state tuning is used for). Reported: the mean
loss of the last 10 steps per lr, and, for scale, Bone (b=32) at its default lr 2e-5 and at 1e-3.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from rwkv_bone.config import RWKV6Config
from rwkv_bone.model import RWKV6
from rwkv_bone.peft import apply_peft


def make_model(seed: int) -> RWKV6:
    torch.manual_seed(seed)
    model = RWKV6.from_config(RWKV6Config(n_layer=2, n_embd=128, vocab_size=256, head_size=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and "time_" not in name and name != "emb.weight":
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def batches(steps: int, batch: int, seed: int):
    """Each sample: random tokens, then the fixed phrase, over and over (64 tokens + 1 target)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, 256, (8,), generator=g)
    for _ in range(steps):
        x = torch.randint(1, 256, (batch, 65), generator=g)
        for start in range(4, 65, 16):            # the phrase after every 8 random tokens
            x[:, start:start + 8] = phrase[: min(8, 65 - start)]
        yield x[:, :-1], x[:, 1:]


def train(method: str, lr: float, steps: int, seed: int, **options) -> float:
    model = make_model(seed)
    apply_peft(model, method, **options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    losses = []
    for x, y in batches(steps, 8, seed + 1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    tail = losses[-10:]
    return sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2,1e-1,1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bone", type=int, default=1, help="1: also the Bone rows, for scale")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    start = train("state", 0.0, 10, args.seed)         # lr 0: the untrained loss
    print(f"{args.steps} steps, batch 8 x 64 tokens; loss = mean of the last 10 steps; "
          f"untrained ~ {start:.3f} (ln V = {math.log(256):.3f})")
    print(f"{'method':<14} {'lr':>8} {'loss':>8}")
    for lr in (float(v) for v in args.lrs.split(",")):
        print(f"{'state':<14} {lr:8.0e} {train('state', lr, args.steps, args.seed):8.3f}", flush=True)
    for lr in (2e-5, 1e-3) if args.bone else ():
        print(f"{'bone b=32':<14} {lr:8.0e} {train('bone', lr, args.steps, args.seed, bone_b=32):8.3f}", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

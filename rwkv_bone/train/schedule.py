"""Learning-rate schedule: linear warm-up, then a decay from lr_init to lr_final over the run.

For optimizer step s (0-based) of a run of S steps with W warm-up steps:
    p = clamp((s - W) / (S - W - 1), 0, 1)            (decay progress; 0 right after warm-up, 1 at the end)
    constant: lr = lr_init
    linear:   lr = lr_init + (lr_final - lr_init) * p
    cosine:   lr = lr_final + (lr_init - lr_final) * (1 + cos(pi * p)) / 2
    exp:      lr = lr_init * (lr_final / lr_init) ** p  (RWKV's exponential decay)
and during warm-up (s < W) the value at p = 0 is scaled by (s + 1) / W.
The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr_init: float, lr_final: float,
          schedule: str = "constant", warmup_steps: int = 0) -> float:
    if step < warmup_steps:
        return lr_init * (step + 1) / warmup_steps
    span = total_steps - warmup_steps - 1
    p = 0.0 if span <= 0 else min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "constant":
        return lr_init
    if schedule == "linear":
        return lr_init + (lr_final - lr_init) * p
    if schedule == "cosine":
        return lr_final + (lr_init - lr_final) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "exp":
        return lr_init * math.exp(math.log(lr_final / lr_init) * p)
    raise ValueError(f"unknown lr schedule {schedule!r}")

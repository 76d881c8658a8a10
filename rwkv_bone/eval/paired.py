"""Paired significance tests for two evaluations of the same items.

Two models scored on the same n test items give per-item verdicts a_i, b_i in {0, 1}. Only the
discordant items carry information about which is better: n01 = #(a wrong, b right) and
n10 = #(a right, b wrong).

McNemar's exact test: under H0 (both equally accurate) each discordant item is a fair coin, so
n01 ~ Binomial(n01 + n10, 1/2), and the two-sided p-value is

    p = min(1, 2 * P(X <= min(n01, n10))),   X ~ Binomial(n01 + n10, 1/2)

(p = 1 when there is no discordant item).

Paired bootstrap (for several seeds at once): each item's score is its mean verdict over the seeds;
resample items with replacement B times and count how often the mean difference b - a is <= 0 (and
>= 0); the two-sided p-value is min(1, 2 * min of the two fractions), with (count + 1) / (B + 1) so a
finite B never claims p = 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(n01, n10): items only b got right, items only a got right."""
    if len(a) != len(b):
        raise ValueError(f"paired tests need the same items: {len(a)} vs {len(b)} verdicts")
    n01 = sum(1 for x, y in zip(a, b) if not x and y)
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    return n01, n10


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for verdicts `a` and `b` on the same items."""
    n01, n10 = discordant(a, b)
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], samples: int = 10000,
                     seed: int = 0) -> tuple[float, float]:
    """(mean difference b - a, two-sided p-value) for per-seed verdict lists a[s][i], b[s][i] on the
    same items i, resampling items (each item's score is its mean over the seeds)."""
    if not a or not b or any(len(r) != len(a[0]) for r in (*a, *b)):
        raise ValueError("paired_bootstrap needs verdict lists of one length for every seed")
    n = len(a[0])
    sa = [sum(r[i] for r in a) / len(a) for i in range(n)]
    sb = [sum(r[i] for r in b) / len(b) for i in range(n)]
    d = np.array([y - x for x, y in zip(sa, sb)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    low = high = 0
    for start in range(0, samples, 1000):  # 1000 resamples at a time: bounded memory
        m = d[rng.integers(0, n, size=(min(1000, samples - start), n))].mean(axis=1)
        low += int((m <= 0).sum())
        high += int((m >= 0).sum())
    p = 2 * min(low + 1, high + 1) / (samples + 1)
    return float(d.mean()), min(1.0, p)


__all__ = ["discordant", "mcnemar_exact", "paired_bootstrap"]

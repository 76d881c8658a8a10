"""Accuracy with a 95% Wilson score interval.

For k correct out of n, p = k / n and z = 1.96:
    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
It stays inside [0, 1] and is sensible at p = 0 or 1, where the normal approximation collapses.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); say so rather than leave rounding noise.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def format_accuracy(correct: int, n: int) -> str:
    """'accuracy: 42.10% (842/2000)'."""
    return f"accuracy: {100 * correct / max(n, 1):.2f}% ({correct}/{n})"

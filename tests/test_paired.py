"""Paired tests (rwkv_bone/eval/paired.py) against hand-computed binomial tails and simulations."""
import math

import numpy as np
import pytest

from rwkv_bone.eval.paired import discordant, mcnemar_exact, paired_bootstrap


def verdicts(n01, n10, n11=5, n00=7):
    a = [False] * n01 + [True] * n10 + [True] * n11 + [False] * n00
    b = [True] * n01 + [False] * n10 + [True] * n11 + [False] * n00
    return a, b


def test_discordant_counts_only_the_disagreements():
    a, b = verdicts(3, 1)
    assert discordant(a, b) == (3, 1)
    with pytest.raises(ValueError):
        discordant([True], [True, False])


@pytest.mark.parametrize("n01,n10,expected", [
    (9, 1, 2 * (1 + 10) / 1024),          # textbook: 2 P(X <= 1), X ~ Bin(10, 1/2) = 0.0215
    (1, 9, 2 * (1 + 10) / 1024),          # symmetric
    (5, 5, 1.0),                          # balanced: capped at 1
    (0, 0, 1.0),                          # no discordant item
    (6, 0, 2 / 64),                       # all one way: 2 * 0.5^6
    (20, 8, 2 * sum(math.comb(28, k) for k in range(9)) / 2**28),
])
def test_mcnemar_exact_equals_the_binomial_tail(n01, n10, expected):
    a, b = verdicts(n01, n10)
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_is_calibrated_under_the_null():
    """Two equally good models: p < 0.05 in at most ~5% of simulated test sets."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        a, b = rng.random(200) < 0.4, rng.random(200) < 0.4
        hits += mcnemar_exact(list(a), list(b)) < 0.05
    assert hits / 400 <= 0.07


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    a, b = verdicts(30, 5, 40, 25)
    diff, p = paired_bootstrap([a], [b], samples=4000)
    assert diff == pytest.approx(25 / 100)
    assert p < 0.01
    same, p_same = paired_bootstrap([a, b], [b, a], samples=2000)
    assert same == 0 and p_same > 0.5
    # the bootstrap and McNemar agree on the order of magnitude for one seed
    a, b = verdicts(14, 5, 60, 21)
    assert abs(paired_bootstrap([a], [b], samples=8000)[1] - mcnemar_exact(a, b)) < 0.04
    with pytest.raises(ValueError):
        paired_bootstrap([[True, False]], [[True]])

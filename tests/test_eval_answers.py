"""Answer extraction and comparison (GSM8K, MetaMathQA and MATH conventions) and the Wilson interval."""
from __future__ import annotations

import math

import pytest

from rwkv_bone.eval.answers import (extract, extract_gsm8k, extract_math, is_correct, last_boxed,
                                    latex_number, normalize_latex, parse_number)
from rwkv_bone.eval.score import format_accuracy, wilson_interval


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),          # GSM8K
    ("So she has 3 + 4 = 7 left.\nThe answer is: 7", "7"),                      # MetaMathQA
    ("He pays $1,200 in total. The answer is $1,200.", "$1,200."),
    ("First 2 * 3 = 6, then 6 + 1 = 7 apples", "7"),                            # last number
    ("#### 18 dollars\nUser: more", "18 dollars"),
    ("no digits at all", ""),
])
def test_gsm8k_extraction_order(text, want):
    assert extract_gsm8k(text) == want


@pytest.mark.parametrize("a, b, same", [
    ("1,234", "1234", True), ("$18", "18", True), ("50%", "50", True), ("18 dollars", "18", True),
    ("7.", "7", True), ("7.0", "7", True), ("7.50", "7.5", True), ("3/4", "0.75", True),
    ("-3", "3", False), ("12", "21", False), ("", "0", False), ("3 + 4", "7", False),
    ("5x", "5", False), ("1,000,000", "1000000.0", True),
])
def test_gsm8k_numbers_compare_numerically(a, b, same):
    assert is_correct("gsm8k", a, b) is same


def test_parse_number_refuses_non_numbers():
    assert parse_number("seven") is None and parse_number("x = 3") is None and parse_number("1/0") is None
    assert parse_number(" 42 ") == 42.0


@pytest.mark.parametrize("text, want", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} then finally \boxed{\left(3, \frac{\pi}{2}\right)}", r"\left(3, \frac{\pi}{2}\right)"),
    (r"\boxed{{a}^{b_{c}}}", r"{a}^{b_{c}}"),                                      # nested braces
    (r"the value is \boxed 5", "5"),
    (r"\fbox{9}", "9"),
    (r"\boxed{unclosed and \boxed{2}", "2"),
])
def test_last_boxed_keeps_nested_braces(text, want):
    assert last_boxed(text) == want


def test_math_extraction_falls_back_to_the_answer_is():
    assert extract_math("We get 12.\nThe answer is: \\frac{3}{4}") == "\\frac{3}{4}"
    assert extract_math("nothing here") == ""
    assert last_boxed("no box") is None


@pytest.mark.parametrize("pred, gold, same", [
    (r"\dfrac{1}{2}", r"\frac12", True), (r"\tfrac{1}{2}", "0.5", True), ("1/2", r"\frac{1}{2}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True), (r"90^\circ", "90", True),
    (r"90^{\circ}", "90", True), (r"10\!000", "10000", True), ("5.", "5", True), ("$5$", "5", True),
    (r"-\frac{1}{2}", "-0.5", True), (r"\frac{2}{4}", r"\frac{1}{2}", True), ("x+1", "x + 1", True),
    ("x+1", "x+2", False), (r"\frac{1}{3}", "0.33", False), ("", "0", False), ("1,000", "1000", True),
])
def test_math_normalisation_and_numeric_comparison(pred, gold, same):
    assert is_correct("math", pred, gold) is same


def test_normalize_latex_and_numbers():
    assert normalize_latex(r" \left[ 1, 2 \right] . ") == "[1,2]"
    assert latex_number(r"\frac{3}{0}") is None and latex_number("abc") is None
    assert float(latex_number(r"\frac34")) == 0.75


def test_exact_task_compares_stripped_strings():
    assert extract("exact", "  Paris \n") == "Paris"
    assert is_correct("exact", "Paris", " Paris ") and not is_correct("exact", "paris", "Paris")


def test_wilson_interval_matches_the_formula_and_stays_in_range():
    lo, hi = wilson_interval(842, 2000)
    p, n, z = 0.421, 2000, 1.959963984540054
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert lo == pytest.approx(c - h) and hi == pytest.approx(c + h)
    assert lo < p < hi
    lo0, hi0 = wilson_interval(0, 10)
    assert lo0 == 0.0 and 0 < hi0 < 0.35
    lo1, hi1 = wilson_interval(10, 10)
    assert hi1 == 1.0 and 0.65 < lo1 < 1
    assert format_accuracy(842, 2000) == "accuracy: 42.10% (842/2000)"

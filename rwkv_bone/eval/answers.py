"""Final answers out of worked solutions, and when two of them agree (GSM8K / MATH conventions).

gsm8k: the text after the last `####`, else after the last `The answer is`, else the last number
       in the text. Two answers agree when both parse as numbers and are equal, after dropping
       `,` `$` `%`, units (trailing words) and a trailing `.` or `.0`; `3/4` parses as 0.75.
math:  the content of the last `\\boxed{...}` (braces nested to any depth), else the text after
       the last `The answer is`. Both sides are normalised (spaces, `\\left`/`\\right`,
       `\\dfrac`/`\\tfrac` -> `\\frac`, `^\\circ`, `\\!`, `$`, a trailing `.`) and compared as
       strings, or numerically when both parse as numbers or simple fractions (`\\frac{1}{2}`,
       `\\frac12`, `1/2`).
exact: the stripped texts are equal.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

TASKS = ("gsm8k", "math", "exact")
ALL_TASKS = TASKS + ("loss",)  # what eval.py --task accepts: the answer tasks and the held-out loss

_ANSWER_IS = re.compile(r"the answer is\s*:?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def _after_answer_is(text: str) -> Optional[str]:
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    return text[hits[-1].end():].strip().split("\n")[0].strip()


def _clean_number_text(s: str) -> str:
    return s.replace(",", "").replace("$", "").replace("%", "").replace("\\$", "").replace("\\%", "")


def extract_gsm8k(text: str) -> str:
    """The final answer of a GSM8K-style solution (see the module docstring); '' when none."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    tail = _after_answer_is(text)
    if tail is not None:
        return tail
    nums = _NUMBER.findall(_clean_number_text(text))
    return nums[-1] if nums else ""


def parse_number(s: str) -> Optional[float]:
    """The number an answer states ('1,234', '$18', '50%', '18 dollars', '7.0.', '3/4'), or None
    when it does not start with one."""
    s = _clean_number_text(s).strip().rstrip(".").strip()
    m = re.match(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(-?\d+(?:\.\d+)?))?(?![\d.])", s)
    if m is None:
        return None
    rest = s[m.end():]
    if rest and not re.fullmatch(r"\s+[A-Za-z][A-Za-z .'/-]*", rest):
        return None  # "3 + 4" or "5x": not a plain number with a unit
    num = float(m.group(1))
    if m.group(2) is not None:
        den = float(m.group(2))
        return None if den == 0 else num / den
    return num


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def gsm8k_equal(pred: str, gold: str) -> bool:
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return pred.strip() != "" and pred.strip() == gold.strip()
    return _numbers_equal(a, b)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces kept; None when absent or
    unclosed. `\\boxed 5` (no braces) gives '5'."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
                j += 1
            continue  # unclosed: try an earlier one
        bare = re.match(r"[^\s$]+", text[i:])
        if bare:
            return bare.group(0)
    return None


def extract_math(text: str) -> str:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tail = _after_answer_is(text)
    return tail if tail is not None else ""


def normalize_latex(s: str) -> str:
    s = s.strip()
    s = re.sub(r"\\text\{\s*\}", "", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    s = s.replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    while s.endswith("."):
        s = s[:-1]
    return s


def latex_number(s: str) -> Optional[Fraction]:
    """A normalised answer as an exact number: '12', '-0.5', '1,000', '3/4', '\\frac{3}{4}',
    '\\frac34', '-\\frac{1}{2}'; None otherwise."""
    s = s.replace(",", "")
    sign = -1 if s.startswith("-") else 1
    body = s[1:] if sign < 0 else s
    m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", body) or \
        re.fullmatch(r"\\frac(\d)(\d)", body) or re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", body)
    try:
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else sign * Fraction(m.group(1)) / den
        if re.fullmatch(r"\d+(?:\.\d+)?|\.\d+", body):
            return sign * Fraction(body)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(pred: str, gold: str) -> bool:
    a, b = normalize_latex(pred), normalize_latex(gold)
    if not a:
        return False
    na, nb = latex_number(a), latex_number(b)
    if na is not None and nb is not None:
        return na == nb
    return a == b


def extract(task: str, text: str) -> str:
    if task == "gsm8k":
        return extract_gsm8k(text)
    if task == "math":
        return extract_math(text)
    return text.strip()


def is_correct(task: str, pred: str, gold: str) -> bool:
    if task == "gsm8k":
        return gsm8k_equal(pred, gold)
    if task == "math":
        return math_equal(pred, gold)
    return pred.strip() == gold.strip()

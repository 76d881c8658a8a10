"""A deterministic GSM8K-style corpus for bench/reproduce_paper.py: multi-step arithmetic word
problems with worked solutions ending in "#### N", and a small word-level World vocab for it.

A problem is a start quantity and 1-3 operations (+, -, x2/x3, equal shares), each told by one of
several sentence templates; the solution states one equation per step:

    question: "Mia has 7 marbles. She finds 5 more marbles. She gives away 4 marbles. How many
               marbles does Mia have now?"
    answer:   "Mia starts with 7 marbles. 7 + 5 = 12. 12 - 4 = 8.\\n#### 8"

Different splits come from different seeds; `make_splits` also drops every question already used
by an earlier split, so no test (or dev) question appears in the training data.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Iterable

NAMES = ("Mia", "Tom", "Anna", "Leo", "Sara", "Ben", "Lily", "Max", "Emma", "Sam", "Nora", "Jack",
         "Ella", "Omar", "Zoe", "Ravi", "Ava", "Noah", "Ivy", "Luca")
SHE = {"Mia", "Anna", "Sara", "Lily", "Emma", "Nora", "Ella", "Zoe", "Ava", "Ivy"}
ITEMS = ("apples", "pens", "books", "marbles", "cookies", "stickers", "cards", "coins", "shells",
         "stamps", "pencils", "flowers", "candies", "toys", "balls")

ADD = ("{P} finds {b} more {item}.", "{P} buys {b} more {item}.", "A friend gives {o} {b} {item}.",
       "{P} gets {b} {item} as a gift.")
SUB = ("{P} gives away {b} {item}.", "{P} loses {b} {item}.", "{P} sells {b} {item}.",
       "{P} gives {b} {item} to a friend.")
MUL = {2: ("{P} doubles the number of {item}.", "Then {p} has twice as many {item}."),
       3: ("{P} triples the number of {item}.", "Then {p} has three times as many {item}.")}
DIV = ("{P} shares the {item} equally with {m} friends, keeping one share.",
       "{P} splits the {item} into {k} equal groups and keeps one group.")


def problem(rng: random.Random) -> dict:
    """One {question, answer} record."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    she = name in SHE
    P, p, o = ("She", "she", "her") if she else ("He", "he", "him")
    x = rng.randint(2, 20)
    story = [f"{name} has {x} {item}."]
    steps = [f"{name} starts with {x} {item}."]
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("add", "sub", "mul", "div"))
        if kind == "mul" and x > 30:
            kind = "sub"
        if kind == "div":
            ks = [k for k in (2, 3, 4, 5) if x % k == 0 and x // k >= 1]
            if not ks:
                kind = "add"
        if kind == "sub" and x < 2:
            kind = "add"
        if kind == "add":
            b = rng.randint(1, 12)
            story.append(rng.choice(ADD).format(P=P, o=o, b=b, item=item))
            steps.append(f"{x} + {b} = {x + b}.")
            x += b
        elif kind == "sub":
            b = rng.randint(1, x - 1)
            story.append(rng.choice(SUB).format(P=P, b=b, item=item))
            steps.append(f"{x} - {b} = {x - b}.")
            x -= b
        elif kind == "mul":
            k = rng.choice((2, 3))
            story.append(rng.choice(MUL[k]).format(P=P, p=p, item=item))
            steps.append(f"{x} * {k} = {x * k}.")
            x *= k
        else:
            k = rng.choice(ks)
            story.append(rng.choice(DIV).format(P=P, m=k - 1, k=k, item=item))
            steps.append(f"{x} / {k} = {x // k}.")
            x //= k
    story.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(story), "answer": " ".join(steps) + f"\n#### {x}"}


def make_splits(sizes: dict[str, int], seeds: dict[str, int]) -> dict[str, list[dict]]:
    """Splits in the order given; each skips questions seen in the splits before it."""
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rng = random.Random(seeds[split])
        recs: list[dict] = []
        tries = 0
        while len(recs) < n:
            tries += 1
            if tries > 50 * n:
                raise RuntimeError(f"cannot draw {n} distinct {split} problems")
            r = problem(rng)
            if r["question"] in seen:
                continue
            seen.add(r["question"])
            recs.append(r)
        out[split] = recs
    return out


def plain_text(rec: dict) -> str:
    """A problem as pre-training text (a different layout from the chat format fine-tuned on)."""
    answer = rec["answer"].split("\n#### ")[0]
    final = rec["answer"].rsplit("#### ", 1)[1]
    return f"Question: {rec['question']}\nSolution: {answer} So the answer is {final}."


def build_vocab(texts: Iterable[str], n_words: int) -> list[bytes]:
    """The 256 single bytes, then the most frequent words (with and without a leading space) and
    a few format pieces: a World vocab where digits stay single characters."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(re.findall(r" ?[A-Za-z]+", t))
    pieces = ["\n\n", "User:", "Assistant:", "####", " ####", "Question:", "Solution:", " =", " +",
              " -", " *", " /"]
    words = [w for w, _ in counts.most_common() if len(w.strip()) > 1][:n_words]
    vocab = [bytes([b]) for b in range(256)]
    for w in pieces + words:
        bw = w.encode("utf-8")
        if bw not in vocab:
            vocab.append(bw)
    return vocab


def write_vocab(vocab: list[bytes], path: str) -> None:
    """ID LITERAL BYTELEN lines (ids from 1; 0 is end of document)."""
    from rwkv_bone.atomic import text_atomic

    lines = []
    for i, tok in enumerate(vocab, 1):
        try:
            lit = repr(tok.decode("utf-8"))
        except UnicodeDecodeError:
            lit = repr(tok)
        lines.append(f"{i} {lit} {len(tok)}")
    text_atomic("\n".join(lines) + "\n", path)

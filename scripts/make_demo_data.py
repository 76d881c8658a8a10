"""Generate the small demo corpus shipped in data/demo/ (deterministic; run it to rebuild).

The texts are written by this script from templates (no third-party text), so they carry the
project's own licence (MIT, see LICENSE). Two files:
- pretrain.txt: short English facts (arithmetic, counting, colours, animals, days, opposites),
  one paragraph per blank-line-separated block, used to train a tiny RWKV-6 base from scratch.
- sft.jsonl: instruction pairs {"query", "response"} in MetaMathQA's field names, used for the
  Bone fine-tune (only the responses are trained).
"""
from __future__ import annotations

import argparse
import json
import os
import random

NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
       "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
       "nineteen", "twenty"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "orange": "orange", "night": "dark", "milk": "white", "leaf": "green"}
ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "lion": "roars",
           "sheep": "bleats", "horse": "neighs", "owl": "hoots", "frog": "croaks", "bee": "buzzes"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new",
             "light": "dark", "open": "closed", "happy": "sad", "early": "late", "high": "low"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def fact(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"{a} plus {b} is {a + b}. {NUM[a].capitalize()} plus {NUM[b]} is {NUM[a + b]}."
    if kind == 1:
        n = rng.randrange(1, 10)
        return "Counting: " + ", ".join(str(i) for i in range(n, n + 6)) + "."
    if kind == 2:
        thing = rng.choice(list(COLOURS))
        return f"The {thing} is {COLOURS[thing]}."
    if kind == 3:
        animal = rng.choice(list(ANIMALS))
        return f"The {animal} {ANIMALS[animal]}. A {animal} is an animal."
    if kind == 4:
        i = rng.randrange(7)
        return f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    word = rng.choice(list(OPPOSITES))
    return f"The opposite of {word} is {OPPOSITES[word]}."


def qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        thing = rng.choice(list(COLOURS))
        return f"What colour is the {thing}?", f"The {thing} is {COLOURS[thing]}."
    if kind == 2:
        animal = rng.choice(list(ANIMALS))
        return f"What sound does a {animal} make?", f"A {animal} {ANIMALS[animal]}."
    if kind == 3:
        i = rng.randrange(7)
        return f"Which day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    word = rng.choice(list(OPPOSITES))
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "demo"))
    p.add_argument("--paragraphs", type=int, default=3000)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pretrain.txt"), "w", encoding="utf-8") as f:
        for _ in range(args.paragraphs):
            f.write(" ".join(fact(rng) for _ in range(rng.randrange(2, 6))) + "\n\n")
    with open(os.path.join(args.out, "sft.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(args.pairs):
            q, a = qa(rng)
            f.write(json.dumps({"query": q, "response": a}) + "\n")


if __name__ == "__main__":
    main()

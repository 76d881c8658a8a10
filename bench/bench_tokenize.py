"""Tokenisation throughput: official rwkv TRIE_TOKENIZER vs ours vs whole make_data runs.

    .venv/bin/python bench/bench_tokenize.py [--mb 30] [--workers 2] [--repeats 3] [--corpus mixed|words|short]

A mixed corpus (English-like prose with Zipf word frequencies, Python-like code, CJK, Cyrillic and
accented Latin, emoji, whitespace runs), or with --corpus words random letter strings with some CJK
and emoji (more, shorter tokens per byte: the per-token costs weigh more), or with --corpus short
those words as 5-word documents (the per-record costs weigh most), is generated with a fixed
seed and written as .jsonl into a temporary folder (nothing is stored in the repo). Timed in the same run:
1. the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER.encode`, one process, encoding only (its
   start-up not timed) - the baseline of every ratio;
2. `WorldTokenizer.encode` (our Python tokenizer), one process, encoding only, from an empty piece
   cache (ids checked equal to 1.);
3. our C trie (data/world_trie.py): `encode` per document (ids to a Python list) and
   `encode_flat` on batches of 64 documents (one call, ids into one array); pyrwkv-tokenizer's
   `encode`, one process, and its `encode_batch` on batches of 64 documents with
   RAYON_NUM_THREADS as set (its Rust thread pool; unset = all cores); all encoding only, ids
   checked equal to 1.;
4. the whole `make_data.py` run as a fresh process (interpreter start, imports, the C trie's
   start-up (check remembered after the first run), read JSON lines, tokenise, write .bin/.idx)
   with --workers 1 and --workers N; the .bin is checked to hold exactly 1.'s ids, 0 after each
   document;
5. the same pipeline in-process with the Python tokenizer (tables prebuilt), --workers 1;
6. make_data.py on a one-document file: its fixed start-up cost (interpreter, imports, the C
   trie's start-up: the cached binary vocab read and the trie built; the start-up check runs
   once, then its pass is remembered, see data/world_trie.py), the part of 4. that does not grow.
Each is repeated (interleaved) and the best wall time kept, since the machine is shared; the CPU
seconds (this process + its child processes) show the work done, whatever the load. Other
processes compete for the cores, so compare ratios from the same run, not absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rwkv_bone.data.prepare import PrepareOptions, prepare  # noqa: E402
from rwkv_bone.data.tokenizer import WorldTokenizer, world_vocab_path  # noqa: E402
from rwkv_bone.data.world_trie import TrieWorldTokenizer  # noqa: E402

COMMON = ("the of and to in a is that for it as was with be by on not he I this are or his from at "
          "which but have an they you were her she there been one all we their has would when if "
          "so no will more can its also into only other some time could new these two may first "
          "then do any like my now over such our man me even most made after world people").split()
SYLL = ["ka", "ri", "to", "men", "stra", "tion", "al", "ex", "pro", "ver", "ing", "ed", "com",
        "ple", "mi", "nu", "qua", "sh", "ter", "ous", "ly", "ment", "de", "con", "tri", "ble"]


def make_corpus(mb: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rare = ["".join(rng.choice(SYLL) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    words = COMMON + rare
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf
    cjk = [chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(3000)] + list("的一是不了人我在有他这")
    misc = list("привет мир café naïve Straße àéîõü ") + ["😀", "🎉", "👍🏽", "🚀", "❤️"]

    def prose() -> str:
        out = []
        for _ in range(rng.randint(3, 12)):
            sent = rng.choices(words, weights, k=rng.randint(5, 25))
            if rng.random() < 0.2:
                sent.insert(rng.randrange(len(sent)), str(rng.randint(0, 99999)))
            out.append(" ".join(sent).capitalize() + rng.choice([".", ".", "?", "!", ";"]))
        return " ".join(out) + ("\n\n" if rng.random() < 0.5 else "")

    def code() -> str:
        lines = []
        for _ in range(rng.randint(5, 30)):
            ind = " " * (4 * rng.randint(0, 3))
            a, b = rng.choice(rare), rng.choice(COMMON)
            lines.append(rng.choice([f"{ind}def {a}_{b}(x, y={rng.randint(0, 9)}):",
                                     f"{ind}return {a}[{b}] + {rng.randint(0, 999)}",
                                     f"{ind}if {a} != {b}:  # {rng.choice(COMMON)}",
                                     f"{ind}{a} = {{'{b}': [{rng.randint(0, 9)}, None]}}"]))
        return "\n".join(lines) + "\n"

    def cjk_text() -> str:
        return "".join(rng.choice(cjk) + ("，" if rng.random() < 0.05 else "")
                       for _ in range(rng.randint(50, 400))) + "。"

    def mixed() -> str:
        return "".join(rng.choice(misc) for _ in range(rng.randint(20, 200))) + \
            " " * rng.randint(1, 300) + "=" * rng.randint(1, 200) + "\t\t\n"

    kinds = [prose] * 12 + [code] * 3 + [cjk_text] * 3 + [mixed]
    docs, size = [], 0
    while size < mb * 1e6:
        doc = "".join(rng.choice(kinds)() for _ in range(rng.randint(1, 4)))
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def make_words_corpus(mb: float, seed: int = 1) -> list[str]:
    """Random lowercase "words" (1-10 letters, uniform: many short, rare tokens per byte) with
    some CJK runs (5% of words) and emoji (2%), 20-400 words per document."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    cjk = [chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(2000)]
    emoji = ["😀", "🎉", "👍", "🚀", "❤️", "🔥", "✨"]
    docs, size = [], 0
    while size < mb * 1e6:
        words = []
        for _ in range(rng.randint(20, 400)):
            r = rng.random()
            if r < 0.05:
                words.append("".join(rng.choice(cjk) for _ in range(rng.randint(1, 6))))
            elif r < 0.07:
                words.append(rng.choice(emoji))
            else:
                words.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 10))))
        docs.append(" ".join(words))
        size += len(docs[-1].encode("utf-8"))
    return docs


def make_short_corpus(mb: float, seed: int = 1) -> list[str]:
    """The words corpus cut into documents of 5 words (~32 bytes): a record per line costs more
    than its tokens here, so make_data's per-record work is what is measured."""
    docs = []
    for doc in make_words_corpus(mb * 1.03, seed):
        words = doc.split(" ")
        docs += [" ".join(words[i:i + 5]) for i in range(0, len(words), 5)]
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30.0, help="corpus size in MB of UTF-8")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--corpus", choices=("mixed", "words", "short"), default="mixed",
                    help="mixed: prose/code/CJK/emoji (make_corpus); words: random words with some CJK/emoji; "
                         "short: the words cut into 5-word documents")
    args = ap.parse_args()
    import numpy as np
    import pyrwkv_tokenizer
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_bone.data.binidx import MMapIndexedDataset

    docs = {"mixed": make_corpus, "words": make_words_corpus, "short": make_short_corpus}[args.corpus](args.mb)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    official = TRIE_TOKENIZER(world_vocab_path())
    native = pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=world_vocab_path())
    WorldTokenizer()  # builds the shared tables (not timed)
    print(f"corpus: {len(docs)} docs, {nbytes / 1e6:.2f} MB; cpus: {os.cpu_count()}, "
          f"load: {os.getloadavg()[0]:.2f}")

    ref = [official.encode(d) for d in docs]  # warm-up, and the ids to check against
    ntok = sum(map(len, ref))
    want_bin = np.concatenate([np.array(r + [0], dtype=np.uint16) for r in ref])
    want_ids = want_bin[want_bin != 0]  # every document's ids, one after another (no id is 0)
    trie, why = TrieWorldTokenizer.create()
    assert trie is not None, why
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def cpu_now() -> float:  # this process + waited-for children (make_data and its workers)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def timed(name: str, fn) -> None:
        t, c = time.perf_counter(), cpu_now()
        fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        cpu[name] = min(cpu.get(name, float("inf")), cpu_now() - c)

    def ours_single() -> None:
        fresh = WorldTokenizer()  # empty piece cache: no help from the previous repeat
        assert [fresh.encode(d) for d in docs] == ref, "ids differ from the official tokenizer"

    def native_single() -> None:
        assert [native.encode(d) for d in docs] == ref, "pyrwkv ids differ from the official tokenizer"

    def trie_single() -> None:
        assert [trie.encode(d) for d in docs] == ref, "C trie ids differ from the official tokenizer"

    def trie_flat() -> None:
        parts = [trie.encode_flat(docs[i:i + 64])[0] for i in range(0, len(docs), 64)]
        assert np.array_equal(np.concatenate(parts), want_ids), "C trie ids differ from the official tokenizer"

    def native_batch() -> None:
        got = [ids for i in range(0, len(docs), 64) for ids in native.encode_batch(docs[i:i + 64])]
        assert got == ref, "pyrwkv batch ids differ from the official tokenizer"

    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workers = sorted({1, args.workers})
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "corpus.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")

        def make_data(w: int) -> None:
            out = os.path.join(d, f"out{w}")
            r = subprocess.run([sys.executable, os.path.join(repo, "make_data.py"), src, "--output", out,
                                "--workers", str(w), "--quiet"], env=env, capture_output=True, text=True)
            assert r.returncode == 0 and "note:" not in r.stderr, r.stderr  # no fallback
            ds = MMapIndexedDataset(out)
            assert len(ds) == len(docs) and np.array_equal(np.asarray(ds.tokens), want_bin)

        tiny = os.path.join(d, "tiny.jsonl")
        with open(tiny, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": docs[0]}, ensure_ascii=False) + "\n")

        def startup() -> None:
            r = subprocess.run([sys.executable, os.path.join(repo, "make_data.py"), tiny, "--output",
                                os.path.join(d, "tiny"), "--workers", "1", "--quiet"], env=env,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr

        def python_pipeline() -> None:
            r = prepare(PrepareOptions(src, os.path.join(d, "outpy"), workers=1, progress=False,
                                       native_tokenizer=False))
            assert r.tokens == ntok + len(docs)

        for _ in range(args.repeats):  # interleaved, best of N: the machine is shared
            timed("official TRIE_TOKENIZER, 1 process", lambda: [official.encode(x) for x in docs])
            timed("ours WorldTokenizer (Python), 1 process", ours_single)
            timed("ours C trie encode, 1 process", trie_single)
            timed("ours C trie encode_flat(64 docs), 1 thread", trie_flat)
            timed("pyrwkv-tokenizer encode, 1 process", native_single)
            timed("pyrwkv-tokenizer encode_batch(64 docs)", native_batch)
            for w in workers:
                timed(f"make_data.py run (C trie), {w} worker(s)", lambda w=w: make_data(w))
            timed("make_data pipeline (Python tok.), 1 worker", python_pipeline)
            timed("make_data.py start-up only (1-doc file)", startup)
    base_name = "official TRIE_TOKENIZER, 1 process"
    base = best[base_name]
    print(f"best of {args.repeats}, load after: {os.getloadavg()[0]:.2f}")
    for name, sec in best.items():
        if "start-up" in name:  # a one-document run: no rates, it is the fixed cost inside 4.
            print(f"{name:44s}: {sec:6.2f} s  {'':44s}cpu {cpu[name]:5.2f} s")
            continue
        print(f"{name:44s}: {sec:6.2f} s  {nbytes / sec / 1e6:6.2f} MB/s  "
              f"{ntok / sec / 1e6:5.2f} Mtok/s  ({base / sec:5.2f}x official)  "
              f"cpu {cpu[name]:5.2f} s ({cpu[base_name] / cpu[name]:5.2f}x by cpu)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The paper's comparisons (Tables 1, 3, 4, 5 and Figures 1/3) at CPU scale, end to end.

    python bench/reproduce_paper.py [--quick] [--work reproduce_out] [--results bench/results]

1. Builds a deterministic GSM8K-style corpus (bench/paper_corpus.py): train / dev / test from
   disjoint seeds, no dev or test question in train (checked), plus a word-level World vocab.
2. Pre-trains one small base from scratch with train.py (cached in --work) on the demo text and
   the same kind of problems written as plain "Question: / Solution:" text (other seeds, none of
   the dev/test questions), so fine-tuning has something to adapt: the chat format and "#### N".
3. Fine-tunes with train.py, at equal trainable parameters (LoRA/PiSSA/OLoRA r = b/2 matches Bone
   b on every layer), the same steps and the same data order per seed: LoRA, PiSSA, OLoRA,
   Bone-row, Bone-col (b=64), Bone-row b in {16, 32, 64, 128}, and Bone-AB. Every method gets
   the same learning-rate grid; its lr is chosen by seed-0 dev accuracy (then training loss), and
   its test accuracy at that lr is reported for every seed (mean +- half the range over seeds).
4. Evaluates with eval.py's library (the adapter is merged into the base by the same loader),
   writes RESULTS/reproduce.md (the paper's table layout) and RESULTS/reproduce_loss.png.
The paper fine-tunes 7B models on 395k MetaMathQA samples; this is a ~2.6M-parameter model on a
few thousand synthetic problems, so only the relative order of the methods is comparable.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_corpus as pc  # noqa: E402

# (key, label, table, train.py flags). Equal trainable parameters: LoRA r = Bone b / 2.
METHODS = [
    ("lora", "LoRA r=32", "t1", ["--peft", "lora", "--lora_r", "32"]),
    ("pissa", "PiSSA r=32", "t1", ["--peft", "pissa", "--lora_r", "32"]),
    ("olora", "OLoRA r=32", "t4", ["--peft", "olora", "--lora_r", "32"]),
    ("bone-row", "Bone-row b=64", "t1", ["--peft", "bone", "--bone_mode", "row", "--bone_b", "64"]),
    ("bone-col", "Bone-col b=64", "t4", ["--peft", "bone", "--bone_mode", "col", "--bone_b", "64"]),
    ("bone-b16", "Bone-row b=16", "t3", ["--peft", "bone", "--bone_mode", "row", "--bone_b", "16"]),
    ("bone-b32", "Bone-row b=32", "t3", ["--peft", "bone", "--bone_mode", "row", "--bone_b", "32"]),
    ("bone-b128", "Bone-row b=128", "t3", ["--peft", "bone", "--bone_mode", "row", "--bone_b", "128"]),
    ("bone-ab", "Bone-AB b=64", "t5", ["--peft", "bone", "--bone_mode", "ab", "--bone_b", "64"]),
]
CPU = ["--accelerator", "cpu", "--precision", "fp32", "--progress", "0"]

SETTINGS = {
    # default: about 30 min on 2 cores (1 thread each is fastest when the machine is shared)
    "full": dict(n_layer=2, n_embd=256, pretrain_steps=500, pretrain_problems=6000, train=3000, dev=100,
                 test=200, steps=60, micro_bsz=8, lrs=(1e-3, 4e-3), seeds=(0, 1), max_tokens=64),
    # --quick: < 8 min, the same pipeline on a smaller scale (1 seed, 1 lr)
    "quick": dict(n_layer=2, n_embd=256, pretrain_steps=100, pretrain_problems=2000, train=1000, dev=40,
                  test=60, steps=20, micro_bsz=8, lrs=(3e-3,), seeds=(0,), max_tokens=64),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_jsonl(recs: list[dict], path: str) -> None:
    from rwkv_bone.atomic import text_atomic

    text_atomic("".join(json.dumps(r) + "\n" for r in recs), path)


def train(argv: list[str], quiet: bool = True) -> None:
    """train.py in this process (same flags, same code path as the command line)."""
    from rwkv_bone.train import parse_args, run

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        code = run(parse_args(argv))
    if code != 0:
        print(sink.getvalue())
        raise RuntimeError(f"train.py {' '.join(argv)} exited with {code}")


def tokenize(src: str, prefix: str, vocab: str, ctx_len: int | None = None):
    from rwkv_bone.data.prepare import PrepareOptions, prepare

    return prepare(PrepareOptions(input=src, output=prefix, tokenizer=vocab, prompt_field="question",
                                  response_field="answer", txt_mode="blocks", workers=1,
                                  progress=False, ctx_len=ctx_len))


def build_data(work: str, s: dict) -> dict:
    """Corpus, vocab, binidx files (built once per --work folder); returns their paths."""
    d = os.path.join(work, "data")
    os.makedirs(d, exist_ok=True)
    done = os.path.join(d, "paths.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    sizes = {"test": s["test"], "dev": s["dev"], "train": s["train"], "pretrain": s["pretrain_problems"]}
    splits = pc.make_splits(sizes, {"test": 101, "dev": 202, "train": 303, "pretrain": 404})
    qs = {k: {r["question"] for r in v} for k, v in splits.items()}
    assert not (qs["test"] & qs["train"]) and not (qs["dev"] & qs["train"]) and not (qs["test"] & qs["dev"])
    assert not (qs["test"] & qs["pretrain"]) and not (qs["dev"] & qs["pretrain"])
    paths = {}
    for k in ("train", "dev", "test"):
        paths[k] = os.path.join(d, f"{k}.jsonl")
        write_jsonl(splits[k], paths[k])
    with open(os.path.join(ROOT, "data", "demo", "pretrain.txt")) as f:
        demo = f.read()
    pre_text = demo.rstrip("\n") + "\n\n" + "\n\n".join(pc.plain_text(r) for r in splits["pretrain"]) + "\n"
    paths["pretrain_txt"] = os.path.join(d, "pretrain.txt")
    with open(paths["pretrain_txt"], "w") as f:
        f.write(pre_text)
    vocab = pc.build_vocab([pre_text] + [r["question"] + " " + r["answer"] for r in splits["train"]], 240)
    paths["vocab"] = os.path.join(d, "vocab.txt")
    pc.write_vocab(vocab, paths["vocab"])
    paths["vocab_size"] = 512 if len(vocab) < 512 else 1024
    pre = tokenize(paths["pretrain_txt"], os.path.join(d, "pretrain"), paths["vocab"], 128)
    paths["pretrain"], paths["pretrain_tokens"] = pre.prefix, pre.tokens
    sft = tokenize(paths["train"], os.path.join(d, "train"), paths["vocab"])
    paths["train_prefix"] = sft.prefix
    from rwkv_bone.data.binidx import MMapIndexedDataset

    longest = int(max(MMapIndexedDataset(sft.prefix).sizes))
    paths["sft_ctx"] = -(-longest // 16) * 16  # every document fits whole
    from rwkv_bone.atomic import text_atomic

    text_atomic(json.dumps(paths), done)
    return paths


def pretrain(work: str, s: dict, data: dict) -> str:
    """The base checkpoint, trained once per setting and reused (cached) afterwards."""
    key = f"base-L{s['n_layer']}-C{s['n_embd']}-s{s['pretrain_steps']}-p{s['pretrain_problems']}"
    proj = os.path.join(work, key)
    ckpt = os.path.join(proj, "rwkv-0.pth")
    if os.path.isfile(ckpt):
        log(f"base: cached {ckpt}")
        return ckpt
    log(f"base: pre-training L{s['n_layer']} C{s['n_embd']} for {s['pretrain_steps']} steps")
    t0 = time.time()
    train(["--load_model", "", "--n_layer", str(s["n_layer"]), "--n_embd", str(s["n_embd"]),
           "--vocab_size", str(data["vocab_size"]), "--peft", "none", "--data_file", data["pretrain"],
           "--ctx_len", "128", "--micro_bsz", "16", "--epoch_steps", str(s["pretrain_steps"]),
           "--lr_init", "3e-3", "--lr_final", "3e-4", "--lr_schedule", "cosine", "--warmup_steps", "20",
           "--proj_dir", proj, *CPU])
    log(f"base: done in {time.time() - t0:.0f} s")
    return ckpt


def finetune_and_eval(work: str, s: dict, data: dict, base: str, method: tuple, lr: float, seed: int,
                      splits: tuple[str, ...]) -> dict:
    from rwkv_bone.eval.evaluate import EvalOptions, evaluate

    key, label, _, flags = method
    proj = run_dir(work, key, lr, seed)
    result_path = os.path.join(proj, "result.json")
    res = {}
    if os.path.isfile(result_path):
        with open(result_path) as f:
            res = json.load(f)
    if not os.path.isfile(os.path.join(proj, "rwkv-0.pth")):
        t0 = time.time()
        train(["--load_model", base, *flags, "--data_file", data["train_prefix"], "--data_type", "sft",
               "--ctx_len", str(data["sft_ctx"]), "--micro_bsz", str(s["micro_bsz"]),
               "--epoch_steps", str(s["steps"]), "--lr_init", str(lr), "--lr_final", str(lr / 10),
               "--lr_schedule", "cosine", "--warmup_steps", str(max(1, s["steps"] // 10)),
               "--random_seed", str(seed), "--proj_dir", proj, *CPU])
        res = {"train_s": time.time() - t0}
    if "trainable" not in res:
        with open(os.path.join(proj, "run.json")) as f:
            res["trainable"] = json.load(f)["trainable_params"]
        with open(os.path.join(proj, "metrics.csv")) as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:] if line]
        tail = [float(r[1]) for r in rows[-max(1, len(rows) // 10):]]
        res["final_train_loss"] = sum(tail) / len(tail)
    for split in splits:
        if f"{split}_acc" in res:
            continue
        summary = evaluate(EvalOptions(model=base, adapters=[os.path.join(proj, "rwkv-0.pth")],
                                       data=data[split], task="gsm8k", output=os.path.join(proj, f"eval-{split}"),
                                       tokenizer=data["vocab"], max_tokens=s["max_tokens"], batch_size=16,
                                       progress=False, quiet=True))
        res[f"{split}_acc"], res[f"{split}_n"] = summary["accuracy"], summary["n"]
        res[f"{split}_tok_s"] = summary["tokens_per_s"]
    from rwkv_bone.atomic import text_atomic

    text_atomic(json.dumps(res, indent=1), result_path)
    return res


def base_accuracy(work: str, s: dict, data: dict, base: str) -> float:
    from rwkv_bone.eval.evaluate import EvalOptions, evaluate

    cached = os.path.join(os.path.dirname(base), "eval-test", "summary.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            return json.load(f)["accuracy"]
    summary = evaluate(EvalOptions(model=base, data=data["test"], task="gsm8k", tokenizer=data["vocab"],
                                   output=os.path.join(os.path.dirname(base), "eval-test"),
                                   max_tokens=s["max_tokens"], progress=False, quiet=True))
    return summary["accuracy"]


def run_dir(work: str, key: str, lr: float, seed: int) -> str:
    return os.path.join(work, "runs", f"{key}-lr{lr:g}-s{seed}")


def _result(work: str, key: str, lr: float, seed: int) -> dict:
    path = os.path.join(run_dir(work, key, lr, seed), "result.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def choose_lr(grid: dict, losses: dict, lrs) -> float:
    """Best seed-0 dev accuracy; ties go to the lower final training loss."""
    return max(lrs, key=lambda x: (grid[x], -losses[x]))


def collect(work: str, s: dict) -> tuple[dict, dict]:
    """(chosen, grid) of every method whose runs are finished, from the result files (so several
    processes, each running some --methods, produce one table)."""
    chosen, grid = {}, {}
    seed0 = s["seeds"][0]
    for key, *_ in METHODS:
        r0 = {lr: _result(work, key, lr, seed0) for lr in s["lrs"]}
        grid[key] = {lr: r["dev_acc"] for lr, r in r0.items() if "dev_acc" in r}
        if len(grid[key]) < len(s["lrs"]):
            continue
        lr = choose_lr(grid[key], {x: r0[x]["final_train_loss"] for x in s["lrs"]}, s["lrs"])
        runs = [_result(work, key, lr, sd) for sd in s["seeds"]]
        if not all("test_acc" in r for r in runs):
            continue
        chosen[key] = {"lr": lr, "trainable": runs[0]["trainable"], "dev": [r["dev_acc"] for r in runs],
                       "test": [r["test_acc"] for r in runs], "loss": [r["final_train_loss"] for r in runs],
                       "dirs": [run_dir(work, key, lr, sd) for sd in s["seeds"]]}
    return chosen, grid


def _pm(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def write_report(path: str, s: dict, mode: str, chosen: dict, grid: dict, base_acc: float, data: dict,
                 elapsed: float, cmd: str) -> None:
    import torch

    from rwkv_bone.atomic import text_atomic

    def row(key):
        m = next(m for m in METHODS if m[0] == key)
        if key not in chosen:
            return f"| {m[1]} | | | not run yet | | |"
        c = chosen[key]
        return (f"| {m[1]} | {c['trainable']:,} | {c['lr']:g} | {_pm(c['dev'])} | **{_pm(c['test'])}** | "
                f"{statistics.fmean(c['loss']):.3f} |")

    head = ("| Method | Trainable | lr (by dev) | dev acc % | test acc % | final train loss |\n"
            "|---|---:|---:|---:|---:|---:|")
    n_seeds = len(s["seeds"])
    lines = [
        "# The paper's comparisons at CPU scale", "",
        f"Command: `{cmd}` ({mode} setting, {elapsed / 60:.1f} min wall time from the first start on this machine, "
        f"{torch.get_num_threads()} torch thread(s)).", "",
        f"Base: RWKV-6 L{s['n_layer']} C{s['n_embd']}, vocab {data['vocab_size']} (word-level World vocab), "
        f"pre-trained from scratch for {s['pretrain_steps']} steps on the demo text plus "
        f"{s['pretrain_problems']} problems in plain text. Fine-tuning: {s['train']} GSM8K-style train problems "
        f"(1-3 operations, worked solutions ending `#### N`), {s['steps']} steps x {s['micro_bsz']} documents, "
        f"cosine lr from the grid {', '.join(f'{x:g}' for x in s['lrs'])} to a tenth of it. "
        f"Seeds {', '.join(map(str, s['seeds']))} (init and data order; the same for every method). "
        f"Accuracy: greedy decoding, exact numeric match after `####`, dev n={s['dev']}, test n={s['test']} "
        f"(95% Wilson half-width at 50% is about {100 * 1.96 * (0.25 / s['test']) ** 0.5:.0f} points). "
        f"Values: mean ± half the range over {n_seeds} seed(s); each method's lr is the grid value with the "
        f"best seed-{s['seeds'][0]} dev accuracy.", "",
        f"Base model before fine-tuning: test accuracy {100 * base_acc:.1f}%.", "",
        "## Table 1: LoRA vs PiSSA vs Bone (equal trainable parameters)", "", head,
        *[row(k) for k in ("lora", "pissa", "bone-row")], "",
        "## Table 4: Bone-row vs Bone-col (and OLoRA)", "", head,
        *[row(k) for k in ("lora", "olora", "bone-row", "bone-col")], "",
        "## Table 3: Bone block size b", "", head,
        *[row(k) for k in ("bone-b16", "bone-b32", "bone-row", "bone-b128")], "",
        "## Table 5: Bone-AB vs Bone-row", "", head,
        *[row(k) for k in ("bone-row", "bone-ab")], "",
        f"## The lr grid (dev accuracy %, seed {s['seeds'][0]})", "",
        "| Method | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " |",
        "|---|" + "---:|" * len(s["lrs"]),
        *[f"| {m[1]} | " + " | ".join(f"{100 * grid[m[0]][lr]:.1f}" if lr in grid.get(m[0], {}) else ""
                                      for lr in s["lrs"]) + " |" for m in METHODS], "",
        f"Loss curves (seed 0, chosen lr): `{os.path.basename(path).replace('.md', '_loss.png')}`.", "",
    ]
    order = sorted(chosen, key=lambda k: -statistics.fmean(chosen[k]["test"]))
    best = ", ".join(f"{next(m[1] for m in METHODS if m[0] == k)} {100 * statistics.fmean(chosen[k]['test']):.1f}"
                     for k in order)
    lines += ["## Reading", "", f"Test accuracy, best first: {best}.", ""]
    if chosen:
        means = [statistics.fmean(c["test"]) for c in chosen.values()]
        width = 1.96 * (0.25 / s["test"]) ** 0.5
        spread = max(means) - min(means)
        lines += [f"The spread between the best and the worst method is {100 * spread:.1f} points; one test "
                  f"accuracy's 95% interval is about +-{100 * width:.0f} points"
                  + (", so at this scale the table does not separate the methods reliably." if spread < width
                     else "."), ""]
    if len(chosen) < len(METHODS):
        lines += [f"**Incomplete: {len(METHODS) - len(chosen)} of {len(METHODS)} methods not run yet.**", ""]
    text_atomic("\n".join(lines), path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 8 min version (1 seed, 1 lr, smaller)")
    ap.add_argument("--work", default=os.path.join(ROOT, "reproduce_out"),
                    help="working folder: data, cached base, runs (reused when rerun)")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"),
                    help="where reproduce.md and reproduce_loss.png go")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads are slower)")
    ap.add_argument("--methods", default="",
                    help="run only these (comma separated keys: " + ", ".join(m[0] for m in METHODS)
                         + "); the report always covers every finished method")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    keys = [k for k in args.methods.split(",") if k]
    bad = [k for k in keys if k not in [m[0] for m in METHODS]]
    if bad:
        ap.error(f"unknown method {bad[0]}; choose from {', '.join(m[0] for m in METHODS)}")
    methods = [m for m in METHODS if not keys or m[0] in keys]
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    work = os.path.join(os.path.abspath(args.work), mode)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    stamp = os.path.join(work, "started")  # the pipeline's first start: elapsed covers every process
    if not os.path.isfile(stamp):
        with open(stamp, "w") as f:
            f.write(str(time.time()))
    with open(stamp) as f:
        t_start = float(f.read())
    data = build_data(work, s)
    log(f"data: {s['train']} train / {s['dev']} dev / {s['test']} test problems, vocab {data['vocab']}, "
        f"sft ctx_len {data['sft_ctx']}")
    base = pretrain(work, s, data)
    base_acc = base_accuracy(work, s, data, base)
    log(f"base test accuracy {100 * base_acc:.1f}%")
    out = os.path.join(args.results, "reproduce.md" if not args.quick else "reproduce_quick.md")
    cmd = "python bench/reproduce_paper.py" + (" --quick" if args.quick else "")

    def report() -> None:
        from rwkv_bone.plot import plot_runs

        chosen, grid = collect(work, s)
        if chosen:
            plot_runs([chosen[m[0]]["dirs"][0] for m in METHODS if m[0] in chosen],
                      os.path.join(args.results, os.path.basename(out).replace(".md", "_loss.png")))
        end = time.time()
        finished = os.path.join(work, "finished")  # the wall time is the one of the complete run
        if len(chosen) == len(METHODS):
            if not os.path.isfile(finished):
                with open(finished, "w") as f:
                    f.write(str(end))
            with open(finished) as f:
                end = float(f.read())
        write_report(out, s, mode, chosen, grid, base_acc, data, end - t_start, cmd)
        with open(os.path.join(work, "chosen.json"), "w") as f:
            json.dump(chosen, f, indent=1)

    for m in methods:
        # lr chosen on seed 0's dev accuracy (ties: lower final training loss), then every seed at it.
        seed0 = s["seeds"][0]
        r0 = {lr: finetune_and_eval(work, s, data, base, m, lr, seed0, ("dev",)) for lr in s["lrs"]}
        for lr, r in r0.items():
            log(f"{m[1]:15s} lr {lr:g} seed {seed0}: dev {100 * r['dev_acc']:.1f}%  "
                f"train loss {r['final_train_loss']:.3f}  ({r.get('train_s', 0):.0f} s train)")
        lr = choose_lr({x: r["dev_acc"] for x, r in r0.items()}, {x: r["final_train_loss"] for x, r in r0.items()},
                       s["lrs"])
        runs = [finetune_and_eval(work, s, data, base, m, lr, sd, ("dev", "test")) for sd in s["seeds"]]
        log(f"{m[1]:15s} chosen lr {lr:g}: test {_pm([r['test_acc'] for r in runs])}%")
        report()  # after every method, so an interrupted run leaves its table so far
    report()
    log(f"wrote {out} in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One evaluation run: records -> greedy completions -> extracted answers -> accuracy (or the loss).

Outputs (DIR = --output), each written atomically:
- DIR/predictions.jsonl: one line per record in input order, {id, prompt, completion, prediction,
  gold, correct} (--task loss: {id, tokens, loss}).
- DIR/summary.json: task, n, correct, accuracy (a fraction in [0, 1]), wilson_95 [low, high],
  tokens, tokens_per_s, seconds, model, adapters, data (--task loss: loss, perplexity, tokens).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import UserError
from .answers import ALL_TASKS, TASKS, extract, is_correct
from .records import DEFAULT_PROMPT_TEMPLATE, Record, load_records
from .score import format_accuracy, wilson_interval

STOP_TEXT = "\n\nUser:"  # the next turn of the chat template: the answer is over


@dataclass
class EvalOptions:
    model: str
    data: str
    task: str
    output: Optional[str] = None
    adapters: Sequence[str] = ()
    batch_size: int = 16
    max_tokens: int = 256
    limit: Optional[int] = None
    seed: Optional[int] = None
    prompt_field: Optional[str] = None
    answer_field: Optional[str] = None
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    tokenizer: Optional[str] = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    lora_alpha: Optional[float] = None
    pissa_init: Optional[str] = None
    progress: bool = True
    quiet: bool = False
    stop: Sequence[str] = field(default_factory=lambda: (STOP_TEXT,))


def check_options(o: EvalOptions) -> None:
    """Everything that can be refused before loading anything."""
    if o.task not in ALL_TASKS:
        raise UserError(f"--task must be one of {', '.join(ALL_TASKS)}, got {o.task!r}")
    if o.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {o.batch_size}")
    if o.max_tokens < 1:
        raise UserError(f"--max_tokens must be at least 1, got {o.max_tokens}")
    if o.limit is not None and o.limit < 1:
        raise UserError(f"--limit must be at least 1, got {o.limit}")
    if not os.path.isfile(o.model):
        raise UserError(f"--model {o.model} does not exist; give the path of an RWKV-6 .pth file")
    for a in o.adapters:
        if not os.path.exists(a):
            raise UserError(f"--adapter {a} does not exist; check the path")
    if o.output is not None:
        parent = os.path.dirname(os.path.abspath(o.output))
        if os.path.exists(o.output) and not os.path.isdir(o.output):
            raise UserError(f"--output {o.output} is a file; give a folder for predictions.jsonl and summary.json")
        if not os.path.isdir(parent):
            raise UserError(f"the folder {parent} holding --output does not exist; create it first")


def load_for_eval(o: EvalOptions):
    from ..loading import load_model

    # Every weight packed, the ones still mapped from the file too (a copy, loading.py): an eval's
    # thousands of steps pay that back, and every --batch_size then sums in the same order, so a
    # completion is the same at any batch size.
    return load_model(o.model, list(o.adapters), dtype=o.dtype, device=o.device,
                      lora_alpha=o.lora_alpha, pissa_init=o.pissa_init, pack=True)


def _select(n_total: int, limit: Optional[int], seed: Optional[int]) -> Optional[list[int]]:
    """Indices to keep: the first `limit`, or with a seed a seeded random `limit` (in order)."""
    if limit is None or limit >= n_total or seed is None:
        return None
    return sorted(random.Random(seed).sample(range(n_total), limit))


class StopWatcher:
    """Per row, whether the decoded text so far contains a stop string (bytes-level for World
    tokenizers, so a check costs O(new token), not O(completion))."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tok = tokenizer
        self.stops = [s.encode("utf-8") for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.bytes_of = getattr(tokenizer, "decode_bytes", None)
        self.buf: dict[int, bytes] = {}

    def __call__(self, row: int, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        if self.bytes_of is None:
            return any(s in self.tok.decode(tokens).encode("utf-8") for s in self.stops)
        new = self.bytes_of([tokens[-1]])
        buf = self.buf[row] = self.buf.get(row, b"") + new
        tail = buf[-(len(new) + self.longest - 1):]  # every occurrence that ends in the new bytes
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(hits)] if hits else text


def _progress(total: int, enabled: bool, unit: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def generate_answers(model, tokenizer, records: list[Record], o: EvalOptions) -> tuple[list[dict], int, float]:
    """Prediction rows (predictions.jsonl), generated tokens and seconds."""
    from ..decode import greedy_batch

    prompts = [tokenizer.encode(r.prompt) for r in records]
    watcher = StopWatcher(tokenizer, o.stop)
    bar = _progress(len(records), o.progress, "rec")
    made = [0]
    t0 = time.perf_counter()

    def on_step(produced: int, finished: int) -> None:
        made[0] += produced
        if bar is not None:
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{made[0] / el:.0f} tok/s", refresh=False)
            bar.update(finished)

    limit = min(model.config.vocab_size, tokenizer.vocab_size)
    try:
        outs = greedy_batch(model, prompts, o.max_tokens, batch_size=o.batch_size, stop=watcher,
                            vocab_limit=limit, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    rows = []
    for r, c in zip(records, outs):
        completion = cut_at_stop(tokenizer.decode(c.tokens), o.stop)
        pred, gold = extract(o.task, completion), extract(o.task, r.answer)
        rows.append({"id": r.id, "prompt": r.prompt, "completion": completion, "prediction": pred,
                     "gold": gold, "correct": bool(is_correct(o.task, pred, gold))})
    return rows, made[0], seconds


def _write_outputs(out_dir: str, rows: list[dict], summary: dict) -> None:
    from ..atomic import text_atomic

    os.makedirs(out_dir, exist_ok=True)
    text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                os.path.join(out_dir, "predictions.jsonl"))
    text_atomic(json.dumps(summary, indent=1) + "\n", os.path.join(out_dir, "summary.json"))


def evaluate(o: EvalOptions, model=None, tokenizer=None) -> dict:
    """Run the evaluation described by `o` (see the module docstring); returns the summary.
    `model` / `tokenizer` may be given already loaded (train.py's validation, benchmarks)."""
    from ..data.tokenizer import load_tokenizer

    check_options(o)
    if tokenizer is None:
        tokenizer = load_tokenizer(o.tokenizer)
    if o.task == "loss":
        return _evaluate_loss(o, model, tokenizer)
    records = load_records(o.data, prompt_field=o.prompt_field, answer_field=o.answer_field,
                           prompt_template=o.prompt_template,
                           limit=o.limit if o.seed is None else None)
    keep = _select(len(records), o.limit, o.seed)
    if keep is not None:
        records = [records[i] for i in keep]
    if model is None:
        model = load_for_eval(o)
    rows, tokens, seconds = generate_answers(model, tokenizer, records, o)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows))
    summary = {"task": o.task, "n": len(rows), "correct": correct, "accuracy": correct / len(rows),
               "wilson_95": [low, high], "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
               "seconds": seconds, "model": o.model, "adapters": list(o.adapters), "data": o.data}
    if o.output is not None:
        _write_outputs(o.output, rows, summary)
    if not o.quiet:
        print(format_accuracy(correct, len(rows)) + f"  [95% CI {100 * low:.1f}-{100 * high:.1f}%]"
              f"  {summary['tokens_per_s']:.0f} tok/s")
    return summary


def _evaluate_loss(o: EvalOptions, model, tokenizer) -> dict:
    from .loss import doc_losses, docs_from_binidx, docs_from_jsonl, summarize_losses

    if o.data.endswith(".jsonl") or (os.path.isfile(o.data) and not o.data.endswith((".bin", ".idx"))):
        docs = docs_from_jsonl(o.data, tokenizer, prompt_field=o.prompt_field, answer_field=o.answer_field,
                               prompt_template=o.prompt_template, limit=o.limit)
    else:
        docs = docs_from_binidx(o.data, o.limit)
    if model is None:
        model = load_for_eval(o)
    bar = _progress(sum(int(m[1:].sum()) for _, m in docs), o.progress, "tok")
    t0 = time.perf_counter()
    try:
        per_doc = doc_losses(model, docs, batch_size=o.batch_size,
                             on_tokens=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    s = summarize_losses(per_doc)
    summary = {"task": "loss", "n": len(docs), **s, "tokens_per_s": s["tokens"] / max(seconds, 1e-9),
               "seconds": seconds, "model": o.model, "adapters": list(o.adapters), "data": o.data}
    rows = [{"id": i, "tokens": n, "loss": (t / n if n else None)} for i, (t, n) in enumerate(per_doc)]
    if o.output is not None:
        _write_outputs(o.output, rows, summary)
    if not o.quiet:
        print(f"loss: {s['loss']:.4f}  perplexity: {s['perplexity']:.3f}  ({s['tokens']} response tokens, "
              f"{len(docs)} documents)")
    return summary

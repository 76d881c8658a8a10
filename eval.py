#!/usr/bin/env python
"""Score an RWKV-6 model (optionally with a fine-tuned adapter) on held-out question/answer data.

  python eval.py --model BASE.pth --adapter ADAPTER.pth --data test.jsonl --task gsm8k --output DIR

Each record's question is rendered with make_data's prompt template ("User: {q}\\n\\nAssistant:"),
answered by greedy decoding (batched, recurrent; stops at token 0 or the next "\\n\\nUser:"), and its
final answer compared with the record's (--task gsm8k: after ####, numbers compared numerically;
math: the last \\boxed{}, normalised LaTeX; exact: stripped strings). --task loss reports the loss
and perplexity over the response tokens instead (a .jsonl or a make_data binidx prefix with masks).
Writes DIR/predictions.jsonl and DIR/summary.json and prints e.g. "accuracy: 42.10% (842/2000)".
"""
from __future__ import annotations

import argparse

from rwkv_bone.cli import run_cli
from rwkv_bone.data.prepare import DEFAULT_PROMPT_TEMPLATE
from rwkv_bone.eval.evaluate import ALL_TASKS
from rwkv_bone.loading import DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the RWKV-6 checkpoint (.pth)")
    p.add_argument("--adapter", action="append", default=[],
                   help="an adapter trained on --model (any format merge.py reads), folded in before evaluating; repeatable (e.g. a Bone adapter and a state adapter)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha of a peer (RWKV-PEFT) LoRA adapter")
    p.add_argument("--pissa_init", default=None, help="init file of a peer PiSSA adapter")
    p.add_argument("--data", required=True, help="test records (.jsonl); for --task loss also a binidx prefix")
    p.add_argument("--task", required=True, choices=ALL_TASKS, help="how answers are extracted and compared")
    p.add_argument("--output", default=None, help="folder for predictions.jsonl and summary.json (created)")
    p.add_argument("--prompt_field", default=None, help="field holding the question (default: by layout)")
    p.add_argument("--answer_field", default=None, help="field holding the answer (default: by layout)")
    p.add_argument("--prompt_template", default=DEFAULT_PROMPT_TEMPLATE,
                   help="as make_data's --prompt_template; must contain {prompt} (default %(default)r)")
    p.add_argument("--batch_size", type=int, default=16, help="records decoded together (default 16)")
    p.add_argument("--max_tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only N records (the first N; with --seed a seeded random N)")
    p.add_argument("--seed", type=int, default=None, help="seed choosing the --limit records")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json or a World-format vocab .txt (default: RWKV World)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weights' dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from rwkv_bone.eval.evaluate import EvalOptions, evaluate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    evaluate(EvalOptions(model=args.model, data=args.data, task=args.task, output=args.output,
                         adapters=args.adapter, batch_size=args.batch_size, max_tokens=args.max_tokens,
                         limit=args.limit, seed=args.seed, prompt_field=args.prompt_field,
                         answer_field=args.answer_field, prompt_template=args.prompt_template,
                         tokenizer=args.tokenizer, device=device, dtype=dtype, lora_alpha=args.lora_alpha,
                         pissa_init=args.pissa_init, progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    run_cli(main)

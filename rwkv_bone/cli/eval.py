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
from typing import Optional

from ..data.prepare import DEFAULT_PROMPT_TEMPLATE
from ..eval.answers import ALL_TASKS
from .args import (add_adapter_args, add_device_args, add_model_arg, add_progress_args, add_prompt_template_arg,
                   add_seed_arg, add_tokenizer_arg, unescape)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    add_adapter_args(p)
    p.add_argument("--data", required=True, help="test records (.jsonl); for --task loss also a binidx prefix")
    p.add_argument("--task", required=True, choices=ALL_TASKS, help="how answers are extracted and compared")
    p.add_argument("--output", default=None, help="folder for predictions.jsonl and summary.json (created)")
    p.add_argument("--prompt_field", default=None, help="field holding the question (default: by layout)")
    p.add_argument("--answer_field", default=None, help="field holding the answer (default: by layout)")
    add_prompt_template_arg(p, DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--batch_size", type=int, default=16, help="records decoded together (default 16)")
    p.add_argument("--max_tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only N records (the first N; with --seed a seeded random N)")
    add_seed_arg(p, default=None, help="seed choosing the --limit records")
    add_tokenizer_arg(p)
    add_device_args(p)
    add_progress_args(p)
    return p


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from ..eval.evaluate import EvalOptions, evaluate
    from ..loading import default_device_dtype

    device, dtype = default_device_dtype(args.device, args.dtype)
    evaluate(EvalOptions(model=args.model, data=args.data, task=args.task, output=args.output,
                         adapters=args.adapter, batch_size=args.batch_size, max_tokens=args.max_tokens,
                         limit=args.limit, seed=args.seed, prompt_field=args.prompt_field,
                         answer_field=args.answer_field, prompt_template=unescape(args.prompt_template),
                         tokenizer=args.tokenizer, device=device, dtype=dtype, lora_alpha=args.lora_alpha,
                         pissa_init=args.pissa_init, progress=args.progress))
    return 0

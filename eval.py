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
# A thin shim: the parser and main live in rwkv_bone.cli.eval (also `rwkv-bone eval ...`).
from rwkv_bone.cli import run_cli
from rwkv_bone.cli.eval import build_parser, main  # noqa: F401 - re-exported

if __name__ == "__main__":
    run_cli(main)

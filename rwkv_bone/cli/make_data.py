#!/usr/bin/env python
"""Tokenise a .jsonl or .txt file into binidx files for train.py (--data_file PREFIX).

  python make_data.py data.jsonl --output data/mydata [--ctx_len 512] [--epochs 3]

.jsonl records: {"text": ...} (trained on everything), {"query": ..., "response": ...} or
{"instruction": ..., "input": ..., "output": ...} (only the response is trained). --format auto
(default) picks per record by the fields present. Instruction records are rendered as
  "User: {prompt}\\n\\nAssistant:" + " {response}"      (the RWKV chat convention)
and get a loss mask PREFIX.mask.bin/.idx (1 on the response tokens and the final end-of-document 0,
0 on the prompt). .txt files: one document per blank-line-separated block (--txt_mode blocks),
per line (lines) or the whole file (whole). Token 0 ends every document.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..data.prepare import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_RESPONSE_TEMPLATE, FORMATS, TXT_MODES, PrepareOptions,
                            prepare)
from .args import add_progress_args, add_prompt_template_arg, add_seed_arg, add_tokenizer_arg, unescape


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a .jsonl (one JSON object per line) or .txt file")
    p.add_argument("--output", "-o", required=True,
                   help="output prefix: writes PREFIX.bin/.idx (+ PREFIX.mask.bin/.idx)")
    add_tokenizer_arg(p)
    p.add_argument("--input_format", choices=("jsonl", "txt"), default=None,
                   help="default: from the file extension")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="jsonl record type: text, qa (query/response), alpaca "
                        "(instruction/input/output), or auto per record (default)")
    p.add_argument("--text_field", default="text")
    p.add_argument("--prompt_field", default="query", help="qa prompt field (default: query)")
    p.add_argument("--response_field", default="response")
    p.add_argument("--instruction_field", default="instruction")
    p.add_argument("--input_field", default="input", help="alpaca optional input field")
    p.add_argument("--output_field", default="output")
    add_prompt_template_arg(p, DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--response_template", default=DEFAULT_RESPONSE_TEMPLATE,
                   help="rendering of the response, must contain {response} "
                        "(default: '%(default)s')")
    p.add_argument("--txt_mode", choices=TXT_MODES, default="blocks",
                   help=".txt documents: blank-line-separated blocks (default), lines, or the "
                        "whole file")
    p.add_argument("--epochs", type=int, default=1,
                   help="write the data N times, each epoch in a new random order (default 1)")
    p.add_argument("--shuffle", action="store_true", help="shuffle even a single epoch")
    add_seed_arg(p, default=0, help="shuffling seed (default 0)")
    p.add_argument("--ctx_len", type=int, default=None,
                   help="print the train.py arguments (--magic_prime, --my_exit_tokens) for "
                        "one pass of pre-training over the data at this context length")
    p.add_argument("--workers", type=int, default=None,
                   help="tokeniser processes (default: all CPU cores)")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip and count bad records instead of stopping at the first one")
    add_progress_args(p)
    return p


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    a = build_parser(prog).parse_args(argv)
    from ..data.prefs import is_preference_file, prepare_pairs

    if is_preference_file(a.input):  # prompt/chosen/rejected records -> a DPO pair dataset
        n = prepare_pairs(a.input, a.output, a.tokenizer, unescape(a.prompt_template), unescape(a.response_template))
        print(f"wrote {a.output}.bin/.idx + .mask + .pairs.json: {n} preference pairs (train.py --objective dpo "
              "--data_type pairs)")
        return 0
    opts = PrepareOptions(
        input=a.input, output=a.output, tokenizer=a.tokenizer, input_format=a.input_format,
        format=a.format, text_field=a.text_field, prompt_field=a.prompt_field,
        response_field=a.response_field, instruction_field=a.instruction_field,
        input_field=a.input_field, output_field=a.output_field,
        prompt_template=unescape(a.prompt_template),
        response_template=unescape(a.response_template), txt_mode=a.txt_mode,
        epochs=a.epochs, shuffle=a.shuffle, seed=a.seed, ctx_len=a.ctx_len, workers=a.workers,
        skip_bad=a.skip_bad, progress=a.progress)
    r = prepare(opts)
    if r.skipped:
        print(f"skipped {r.skipped} bad records (first: {r.first_skipped})", file=sys.stderr)
    print(f"wrote {r.prefix}.bin/.idx: {r.documents} documents x {r.epochs} epochs, "
          f"{r.tokens} tokens ({r.dtype.name}, vocab {r.vocab_size})"
          + (f"; loss masks in {r.prefix}.mask.bin/.idx" if r.has_masks else ""))
    if r.train_args():
        print(f"train.py arguments for one pass: {r.train_args()}")
    return 0

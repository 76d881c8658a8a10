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
# A thin shim: the parser and main live in rwkv_bone.cli.make_data (also `rwkv-bone make-data ...`).
from rwkv_bone.cli import run_cli
from rwkv_bone.cli.make_data import build_parser, main  # noqa: F401 - re-exported

if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""Continue a prompt with an RWKV-6 model (optionally with a fine-tuned adapter), streaming the text.

  python generate.py --model BASE.pth [--adapter ADAPTER.pth] --prompt "User: hi\\n\\nAssistant:"

The adapter (from train.py, or an RWKV-PEFT file) is folded into the weights before generation, so
it costs nothing per token. Decoding is sampled by default (--temperature 1.0, --top_p 0.85);
--greedy (or --temperature 0) always takes the most likely token. Generation stops at the
end-of-document token 0, after --max_tokens tokens, or just before a --stop string (not printed).
In --prompt and --stop, \\n and \\t stand for a newline and a tab; use --prompt_file for text
taken verbatim. Only the continuation is printed, as it is generated.
"""
# A thin shim: the parser and main live in rwkv_bone.cli.generate (also `rwkv-bone generate ...`).
from rwkv_bone.cli import run_cli
from rwkv_bone.cli.generate import build_parser, main, read_prompt  # noqa: F401 - re-exported

if __name__ == "__main__":
    run_cli(main)

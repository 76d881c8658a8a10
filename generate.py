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
from __future__ import annotations

import argparse
import sys

from rwkv_bone.cli import run_cli
from rwkv_bone.errors import UserError
from rwkv_bone.generate import DEFAULT_TOP_P
from rwkv_bone.loading import DTYPES


def _unescape(s: str) -> str:
    """Let prompts typed in a shell use \\n and \\t (the RWKV chat format needs blank lines)."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the RWKV-6 checkpoint (.pth)")
    p.add_argument("--adapter", action="append", default=None,
                   help="an adapter trained on --model, folded in before generating: ours, RWKV-PEFT's "
                        ".pth (.bone/.disha, LoRA, state), or an HF PEFT folder; repeat to combine, "
                        "e.g. --adapter bone.pth --adapter state.pth")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha of a peer (RWKV-PEFT) LoRA adapter; ours record it")
    p.add_argument("--pissa_init", default=None,
                   help="init file of a peer PiSSA adapter; ours keep it in the adapter file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue (\\n = newline, \\t = tab)")
    src.add_argument("--prompt_file", help="read the prompt from this UTF-8 file, verbatim")
    p.add_argument("--max_tokens", type=int, default=200, help="new tokens at most (default 200)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, >= 0; 0 = greedy (default 1.0)")
    p.add_argument("--top_p", type=float, default=DEFAULT_TOP_P,
                   help="nucleus sampling: draw only from the most likely tokens holding this "
                        "much probability, in (0, 1]; 1 = all tokens (default %(default)s)")
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also stop before this text, e.g. '\\n\\nUser:' (repeatable); "
                        "token 0 (end of document) always stops")
    p.add_argument("--tokenizer", default=None,
                   help="a Hugging Face tokenizer.json or a World-format vocab .txt "
                        "(default: RWKV World, rwkv_vocab_v20230424 from the rwkv package)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weights' dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    return p


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except FileNotFoundError:
            raise UserError(f"prompt file {args.prompt_file} does not exist; check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file} as UTF-8 text ({e})") from None
    else:
        prompt = _unescape(args.prompt)
    if not prompt:
        raise UserError("the prompt is empty; pass the text to continue with --prompt or --prompt_file")
    return prompt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from rwkv_bone.data.tokenizer import load_tokenizer
    from rwkv_bone.generate import check_sampling, stream_text
    from rwkv_bone.loading import load_model

    # Everything a user can get wrong in the flags is refused before the slow loading starts.
    temperature = 0.0 if args.greedy else args.temperature
    check_sampling(temperature, args.top_p)
    if args.max_tokens < 0:
        raise UserError(f"--max_tokens {args.max_tokens} is negative; ask for 0 or more new tokens")
    prompt = read_prompt(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]

    model = load_model(args.model, args.adapter, dtype=dtype, device=device,
                       lora_alpha=args.lora_alpha, pissa_init=args.pissa_init)
    tokenizer = load_tokenizer(args.tokenizer)
    for piece in stream_text(model, tokenizer, prompt, args.max_tokens, temperature=temperature,
                             top_p=args.top_p, seed=args.seed, stop=[_unescape(s) for s in args.stop]):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    run_cli(main)

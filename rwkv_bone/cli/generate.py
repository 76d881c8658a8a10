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
from typing import Optional

from ..errors import UserError
from .args import add_adapter_args, add_device_args, add_model_arg, add_seed_arg, add_tokenizer_arg, unescape

DEFAULT_TOP_P = 0.85  # rwkv_bone.generate.DEFAULT_TOP_P (not imported: it would load torch for --help)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    add_adapter_args(p)
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
    add_seed_arg(p, default=None, help="random seed for reproducible sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also stop before this text, e.g. '\\n\\nUser:' (repeatable); "
                        "token 0 (end of document) always stops")
    add_tokenizer_arg(p)
    add_device_args(p)
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
        prompt = unescape(args.prompt)
    if not prompt:
        raise UserError("the prompt is empty; pass the text to continue with --prompt or --prompt_file")
    return prompt


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from ..data.tokenizer import load_tokenizer
    from ..generate import check_sampling, stream_text
    from ..loading import default_device_dtype, load_model

    # Everything a user can get wrong in the flags is refused before the slow loading starts.
    temperature = 0.0 if args.greedy else args.temperature
    check_sampling(temperature, args.top_p)
    if args.max_tokens < 0:
        raise UserError(f"--max_tokens {args.max_tokens} is negative; ask for 0 or more new tokens")
    prompt = read_prompt(args)
    device, dtype = default_device_dtype(args.device, args.dtype)

    model = load_model(args.model, args.adapter, dtype=dtype, device=device,
                       lora_alpha=args.lora_alpha, pissa_init=args.pissa_init)
    tokenizer = load_tokenizer(args.tokenizer)
    for piece in stream_text(model, tokenizer, prompt, args.max_tokens, temperature=temperature,
                             top_p=args.top_p, seed=args.seed, stop=[unescape(s) for s in args.stop]):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

"""Argument groups every tool shares, spelled the same way everywhere: the base model and its
adapters, device/dtype, progress, seed, and the one unescape for prompts and templates typed in a
shell. Imports no torch (a parser must answer --help at once)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..data.records import unescape_template

DTYPE_NAMES = ("fp32", "bf16")  # the keys of rwkv_bone.loading.DTYPES (a test checks they agree)


# The one unescape for prompts, stop strings and templates typed in a shell (\n, \t): the record
# module's, so make_data, eval, generate and training validation turn the same text into the same template.
unescape = unescape_template


def bool01(text: str) -> bool:
    """--progress 0|1 (also true/false, yes/no)."""
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def add_model_arg(p: argparse.ArgumentParser, *, aliases: Sequence[str] = (), dest: str = "model",
                  required: bool = True, help: str = "the RWKV-6 checkpoint (.pth)") -> None:
    """--model (and any older spelling as an alias of the same argument)."""
    p.add_argument("--model", *aliases, dest=dest, required=required, help=help)


def add_adapter_args(p: argparse.ArgumentParser, *, required: bool = False,
                     help: str = "an adapter trained on --model (ours, RWKV-PEFT's .pth or an HF PEFT folder), "
                                 "folded in first; repeatable, e.g. --adapter bone.pth --adapter state.pth") -> None:
    """--adapter (repeatable), --lora_alpha, --pissa_init: what rwkv_bone.loading.read_adapters takes."""
    p.add_argument("--adapter", action="append", required=required, default=None if required else [], help=help)
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha of a peer (RWKV-PEFT) LoRA .pth file; ours and PEFT folders record it "
                        "(scale = alpha / r)")
    p.add_argument("--pissa_init", default=None,
                   help="init file (init_lora_A/B) of a peer PiSSA adapter; ours keep it in the adapter file")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --device (defaults chosen by rwkv_bone.loading.default_device_dtype)."""
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights' dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def add_progress_args(p: argparse.ArgumentParser, *, with_progress: bool = True) -> None:
    """--progress 0|1 and its aliases --no_progress / --quiet, all into args.progress (default on).
    with_progress=False adds only the aliases (for a parser that already has --progress)."""
    if with_progress:
        p.add_argument("--progress", type=bool01, default=True, metavar="0|1", help="show the progress bar (default 1)")
    p.add_argument("--no_progress", "--quiet", dest="progress", action="store_false",
                   help="no progress bar (same as --progress 0)")


def add_seed_arg(p: argparse.ArgumentParser, *, default: Optional[int], help: str,
                 aliases: Sequence[str] = ()) -> None:
    p.add_argument("--seed", *aliases, dest="seed", type=int, default=default, help=help)


def add_prompt_template_arg(p: argparse.ArgumentParser, default: str) -> None:
    """--prompt_template, shown and typed with \\n for newlines (unescape() turns them back)."""
    p.add_argument("--prompt_template", default=default.replace("\n", "\\n"),
                   help="rendering of the prompt, must contain {prompt}; \\n = newline (default: %(default)s)")


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="a Hugging Face tokenizer.json or a World-format vocab .txt "
                        "(default: RWKV World, rwkv_vocab_v20230424 from the rwkv package)")


__all__ = ["DTYPE_NAMES", "unescape", "bool01", "add_model_arg", "add_adapter_args", "add_device_args",
           "add_progress_args", "add_seed_arg", "add_prompt_template_arg", "add_tokenizer_arg"]

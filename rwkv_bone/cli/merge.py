"""Fold adapters into their base model: a plain RWKV-6 checkpoint with no inference overhead.

    python merge.py --model BASE.pth --adapter ADAPTER --output OUT.pth [--adapter STATE.pth ...]

ADAPTER may be any format rwkv_bone.peft.formats reads, recognised by its content: rwkv-bone adapter
files (settings stored inside); RWKV-PEFT .pth files (3-D `.bone`/`.disha` = block-affine
Bone-row, 2-D = MiSS, lora_A/B, state tuning `blocks.{i}.att.time_state`, and the time_*/ln tensors
it saves beside them); HF PEFT / RWKV-PEFT folders (adapter_config.json + adapter_model.safetensors
or .bin: MiSS default/bat/mini, LoRA incl. rsLoRA; pass the folder or its weight file). Several
--adapter are folded in order. Peer LoRA .pth files carry no alpha, so they need --lora_alpha;
peer PiSSA files need --pissa_init (the init file holding init_lora_A/B). A state adapter adds its
learned initial states as official keys, which the `rwkv` package starts every sequence from. The
merge is computed in float32 and written in the base checkpoint's dtype (states stay float32),
atomically (an existing OUT is only replaced by a complete file).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

from ..atomic import check_writable_dir
from ..errors import UserError
from .args import add_adapter_args, add_model_arg


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_arg(p, aliases=("--base",), dest="base",
                  help="the base RWKV-6 checkpoint (.pth) the adapter was trained on (--base: the same)")
    add_adapter_args(p, required=True,
                     help="the adapter from train.py, RWKV-PEFT or HF PEFT (file or folder); repeatable")
    p.add_argument("--output", required=True,
                   help="where to write the merged RWKV-6 checkpoint (.pth; .safetensors when it ends so)")
    return p


def parse_args(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def check_output(args: argparse.Namespace) -> None:
    """--output must be a new file or an earlier merge, never one of the inputs (the base is the one
    file a user cannot regenerate), never a folder."""
    if os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder; give the path of the .pth file to write")
    inputs = [("--base", args.base), *(("--adapter", a) for a in args.adapter), ("--pissa_init", args.pissa_init)]
    for flag, path in inputs:
        if path is not None and flag == "--base" and not os.path.exists(path):
            path += ".pth"  # load_state_dict also accepts a model named without its .pth suffix
        if path is None or not os.path.exists(args.output) or not os.path.exists(path):
            continue
        if os.path.samefile(args.output, path):
            raise UserError(f"--output {args.output} is the {flag} file; merging would overwrite it, so "
                            "choose another output path")
    check_writable_dir(args.output, "output")


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    from ..loading import read_adapters
    from ..merging import merge_checkpoint
    from ..peft.registry import get_method

    check_output(args)
    files = read_adapters(args.adapter, args.lora_alpha, args.pissa_init)
    # Streamed from the memory-mapped base, one merged layer at a time (rwkv_bone/merging.py).
    merge_checkpoint(args.base, files, args.output)
    for af in files:
        parts = [f"{len(af.layers)} {get_method(af.meta['method']).label(af.meta)} layers"] if af.layers else []
        parts += [f"{len(af.states)} learned initial states"] if af.states else []
        parts += [f"{len(af.others)} trained tensors"]
        print(f"merged {', '.join(parts)} from {af.path} into {args.output}")
    return 0

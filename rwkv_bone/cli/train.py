"""Fine-tune an RWKV-6 model with Bone / LoRA / PiSSA / OLoRA (or train from scratch).

    python train.py --model rwkv6-1b6.pth --data_file data/mydata --peft bone --bone_b 64 \\
        --ctx_len 512 --micro_bsz 8 --epoch_steps 1000 --epoch_count 1 --proj_dir out/bone

The flags are rwkv_bone.train.args' (names as in RWKV-LM / RWKV-PEFT; --model = --load_model,
--seed = --random_seed); this module adds the progress aliases every tool shares.
"""
from __future__ import annotations

import argparse
from typing import Optional

from ..train.args import build_parser as _train_parser
from ..train.args import validate
from .args import add_progress_args


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = _train_parser()
    if prog is not None:
        p.prog = prog
    add_progress_args(p, with_progress=False)  # --no_progress / --quiet beside train's --progress 0|1
    return p


def parse_args(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """As rwkv_bone.train.parse_args, with the shared progress aliases."""
    args = build_parser(prog).parse_args(argv)
    validate(args)
    return args


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    if args.dry_run:  # shapes only: no Lightning, no weights
        from ..train.plan import dry_run

        return dry_run(args)
    from ..train.run import run

    return run(args)

#!/usr/bin/env python
"""Fine-tune an RWKV-6 model with Bone / LoRA / PiSSA / OLoRA (or train from scratch).

    python train.py --model rwkv6-1b6.pth --data_file data/mydata --peft bone --bone_b 64 \
        --ctx_len 512 --micro_bsz 8 --epoch_steps 1000 --epoch_count 1 --proj_dir out/bone

`python train.py --help` lists every flag; see configs/ for the paper's settings.
"""
# A thin shim: the parser and main live in rwkv_bone.cli.train (also `rwkv-bone train ...`).
from rwkv_bone.cli import run_cli
from rwkv_bone.cli.train import build_parser, main, parse_args  # noqa: F401 - re-exported

if __name__ == "__main__":
    run_cli(main)

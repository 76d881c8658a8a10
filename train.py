#!/usr/bin/env python
"""Fine-tune an RWKV-6 model with Bone / LoRA / PiSSA / OLoRA (or train from scratch).

    python train.py --load_model rwkv6-1b6.pth --data_file data/mydata --peft bone --bone_b 64 \
        --ctx_len 512 --micro_bsz 8 --epoch_steps 1000 --epoch_count 1 --proj_dir out/bone

`python train.py --help` lists every flag; see configs/ for the paper's settings.
"""
from rwkv_bone.cli import run_cli


def main() -> int:
    from rwkv_bone.train import parse_args, run

    return run(parse_args())


if __name__ == "__main__":
    run_cli(main)

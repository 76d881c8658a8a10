"""Fold an adapter into its base model: a plain RWKV-6 checkpoint with no inference overhead.

    python merge.py --base BASE.pth --adapter ADAPTER.pth --output OUT.pth

Reads rwkv-bone adapter files (settings stored inside) and RWKV-PEFT files with no flags:
3-D `.bone` = block-affine Bone-row, 2-D `.bone` = simplified Bone. Peer LoRA files carry no
alpha, so they need --lora_alpha; peer PiSSA files need --pissa_init (the init file holding
init_lora_A/B). The merge is computed in float32 and written in the base checkpoint's dtype,
atomically (an existing OUT is only replaced by a complete file).
"""
from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base RWKV-6 checkpoint (.pth) the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter file (.pth) from train.py or RWKV-PEFT")
    p.add_argument("--output", required=True, help="where to write the merged RWKV-6 checkpoint (.pth)")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha of a peer LoRA file (ours record it; scale = alpha / r)")
    p.add_argument("--pissa_init", default=None,
                   help="peer PiSSA init file with init_lora_A/B (ours keep them in the adapter file)")
    return p.parse_args(argv)


def check_output(args: argparse.Namespace) -> None:
    """--output must be a new file or an earlier merge, never one of the inputs (the base is the one
    file a user cannot regenerate), never a folder."""
    import os

    from rwkv_bone.cli import check_writable_dir
    from rwkv_bone.errors import UserError

    if os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder; give the path of the .pth file to write")
    for flag, path in (("--base", args.base), ("--adapter", args.adapter), ("--pissa_init", args.pissa_init)):
        if path is not None and flag == "--base" and not os.path.exists(path):
            path += ".pth"  # load_state_dict also accepts a model named without its .pth suffix
        if path is None or not os.path.exists(args.output) or not os.path.exists(path):
            continue
        if os.path.samefile(args.output, path):
            raise UserError(f"--output {args.output} is the {flag} file; merging would overwrite it, so "
                            "choose another output path")
    check_writable_dir(args.output, "output")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rwkv_bone.checkpoint import first_non_finite, load_state_dict
    from rwkv_bone.cli import torch_save_atomic
    from rwkv_bone.errors import UserError
    from rwkv_bone.peft.adapter_io import merge_state_dict, read_adapter_file

    check_output(args)
    af = read_adapter_file(args.adapter, args.lora_alpha, args.pissa_init)
    base = load_state_dict(args.base)
    merged = merge_state_dict(base, af)
    bad = first_non_finite(merged)
    if bad is not None:
        raise UserError(f"merging {args.adapter} into {args.base} gives NaN or infinite values in {bad} "
                        f"(adapter values too large for the base's {base[bad].dtype}?); nothing was written")
    torch_save_atomic(merged, args.output)
    mode = f" ({af.meta['bone_mode']}, b={af.meta['bone_b']})" if af.meta["method"] == "bone" else ""
    print(f"merged {len(af.layers)} {af.meta['method']}{mode} layers and {len(af.others)} trained "
          f"tensors into {args.output}")
    return 0


if __name__ == "__main__":
    from rwkv_bone.cli import run_cli

    run_cli(main)

"""What a run would be, without Lightning or the weights: the checkpoint's config (read once, shared
with the model build), the architecture line and the trainable count that --dry_run prints. Kept
apart from run.py so a dry run imports neither Lightning nor DeepSpeed (seconds at 7B)."""
from __future__ import annotations

import argparse

from . import args as A


def load_base(args: argparse.Namespace):
    """(RWKV6Config, validated --load_model state dict or None): the checkpoint is read once, and
    both the config and the model are built from that one (memory-mapped) state dict. The config
    carries --wkv_backend."""
    config, sd = _base_dims(args)
    return config.replace(wkv_backend=getattr(args, "wkv_backend", "auto")), sd


def _base_dims(args: argparse.Namespace):
    from ..config import RWKV6Config

    if args.load_model:
        from ..checkpoint import load_state_dict

        sd = load_state_dict(args.load_model)
        return RWKV6Config.from_state_dict(sd), sd
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    if args.model_preset:
        return RWKV6Config.preset(args.model_preset, **overrides), None
    return RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab_size or 65536), None


def model_config(args: argparse.Namespace):
    """RWKV6Config from --load_model's shapes, or from --model_preset / explicit dims."""
    return load_base(args)[0]


def describe(config) -> str:
    c = config
    return (f"RWKV-6 L={c.n_layer} C={c.n_embd} A={c.dim_att} F={c.dim_ffn} V={c.vocab_size} "
            f"H={c.n_head} N={c.head_size} Dm={c.dim_maa} Dd={c.dim_decay}")


def count_params(config, args: argparse.Namespace) -> int:
    from ..model import RWKV6
    from ..peft import count_trainable

    if args.peft == "none":
        return sum(p.numel() for p in RWKV6.from_config(config, device="meta").parameters())
    return count_trainable(config, args.peft, A.train_parts(args), **A.peft_options(args))


def dry_run(args: argparse.Namespace) -> int:
    """Print the architecture and trainable count; a --load_model checkpoint is read for its shapes
    only (validated, no weight touched), so a 7B dry run takes seconds and no memory."""
    if args.load_model:
        from ..checkpoint import read_config

        config = read_config(args.load_model)
    else:
        config = model_config(args)
    n = count_params(config, args)
    print(f"model: {describe(config)}")
    print(f"method: {A.method_label(args)}" + (f" + {args.train_parts}" if args.train_parts else ""))
    print(f"trainable parameters: {n:,}")
    return 0

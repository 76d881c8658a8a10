"""Command-line settings of train.py (names as in RWKV-LM / RWKV-PEFT) and their validation.

Everything that can be checked without touching the data or the checkpoint is checked here and
reported as one `UserError` sentence; file-level checks live next to the code that reads the files.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Sequence

from ..errors import UserError
from ..peft import registry
from .objectives.options import add_objective_args, validate_objective

TRAIN_TYPES = ("none", "infctx")
QUANT_TYPES = ("none", "nf4", "fp4", "int8")
ADAPTER_FORMATS = ("ours", "peft")
# --lr_init when not given: adapters (and full fine-tuning) vs state tuning, whose (H, N, N) states
# need a far larger step (measured in bench/bench_state_lr.py, see the README).
DEFAULT_LR = 2e-5
DEFAULT_STATE_LR = 1.0
TRAIN_PARTS = ("time", "ln", "emb", "head")
LR_SCHEDULES = ("constant", "linear", "cosine", "exp")
STRATEGIES = (
    "auto",
    "ddp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)
# What --precision accepts, mapped to the two behaviours we implement (see `precision_mode`).
WKV_BACKENDS = ("auto", "cuda", "fla", "chunked")  # = rwkv_bone.wkv.BACKENDS (not imported: keeps the CLI light)
VALID_TASKS = ("none", "gsm8k", "math", "exact")
PRECISIONS = {"bf16": "bf16", "bf16-mixed": "bf16", "fp32": "fp32", "32": "fp32", "32-true": "fp32"}


def peft_methods() -> tuple[str, ...]:
    """--peft's choices: none and every method of the registry."""
    return ("none", *registry.methods())


def _bool01(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune (or pre-train) an RWKV-6 model with Bone / LoRA / PiSSA / OLoRA adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--load_model", "--model", default=None,
                   help='RWKV-6 checkpoint (.pth) to fine-tune (--model: the same); dims are read from its shapes. '
                        '"" trains from scratch (needs --model_preset or --n_layer/--n_embd, and --peft none)')
    g.add_argument("--model_preset", default="",
                   help="1.6b, 3b, 7b or 14b: dims for --dry_run or from-scratch training")
    g.add_argument("--n_layer", type=int, default=0, help="layers, only when training from scratch")
    g.add_argument("--n_embd", type=int, default=0, help="width, only when training from scratch")
    g.add_argument("--vocab_size", type=int, default=0, help="vocabulary when training from scratch (0 = 65536)")

    g = p.add_argument_group("data")
    g.add_argument("--data_file", default="", help="binidx prefix (PREFIX.bin / PREFIX.idx, no extension)")
    g.add_argument("--data_type", default="binidx", choices=("binidx", "sft", "pairs"),
                   help="binidx: random ctx_len+1 windows of the token stream; sft: one document per sample "
                        "with the loss mask PREFIX.mask.bin/.idx; pairs: preference pairs (--objective dpo)")
    g.add_argument("--ctx_len", type=int, default=512, help="tokens per sample")
    g.add_argument("--sft_pack", type=_bool01, default=False,
                   help="1 (sft only): pack several documents into each ctx_len row, each starting from a "
                        "clean state (first-fit in the data order)")
    g.add_argument("--magic_prime", type=int, default=0,
                   help="binidx only: visit every ctx_len chunk once (p prime, p %% 3 == 2, p <= tokens//ctx_len - 1)")
    g.add_argument("--train_type", default="none", choices=TRAIN_TYPES,
                   help="infctx: run each ctx_len sample in chunks of --chunk_ctx tokens carrying the state "
                        "(exact gradients, memory of one chunk); none: the whole sample at once")
    g.add_argument("--chunk_ctx", type=int, default=512, help="tokens per chunk with --train_type infctx")
    g.add_argument("--my_exit_tokens", type=int, default=0, help="stop after this many training tokens (0 = off)")

    g = p.add_argument_group("schedule")
    g.add_argument("--micro_bsz", type=int, default=4, help="samples per device per micro-batch")
    g.add_argument("--accumulate_grad_batches", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epoch_steps", type=int, default=1000, help="optimizer steps per epoch (RWKV convention)")
    g.add_argument("--epoch_count", type=int, default=1, help="epochs to train")
    g.add_argument("--epoch_begin", type=int, default=0, help="number of the first epoch (checkpoint and log names)")
    g.add_argument("--epoch_save", type=int, default=1, help="write rwkv-{epoch}.pth every this many epochs")
    g.add_argument("--save_every_steps", type=int, default=0,
                   help="also save the resumable training state every this many steps (0 = at epoch ends only)")
    g.add_argument("--lr_init", type=float, default=None,
                   help=f"learning rate after warm-up (default {DEFAULT_LR:g}; {DEFAULT_STATE_LR:g} with --peft state)")
    g.add_argument("--lr_final", type=float, default=None, help="learning rate at the last step (default lr_init)")
    g.add_argument("--lr_schedule", default="constant", choices=LR_SCHEDULES,
                   help="decay from lr_init to lr_final over the run (exp = RWKV's exponential decay)")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps")

    g = p.add_argument_group("optimizer")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2")
    g.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (2-D+ tensors only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--layerwise_lr", type=_bool01, default=False,
                   help="1: RWKV-LM's x060 lr groups: tensors named *time_decay* (time_decay, time_decay_w1/w2) "
                        "at 2x the lr, the rest 1x; needs them to train (--train_parts time, or --peft none)")
    g.add_argument("--grad_cp", type=_bool01, default=False, help="1: activation checkpointing per block")
    g.add_argument("--chunked_ce", type=_bool01, default=True,
                   help="1: head + cross-entropy in token chunks, recomputed in backward (the (B, T, V) "
                        "logits never exist whole); 0: the plain path")
    g.add_argument("--l2wrap", type=_bool01, default=None,
                   help="RWKV's L2Wrap (a 1e-4/tokens pull on each position's largest logit); "
                        "default: on for --peft none, off for adapters")

    g = p.add_argument_group("adapter")
    g.add_argument("--peft", default="bone", choices=peft_methods(), help="adapter method (none = train all weights)")
    add_method_options(g)
    g.add_argument("--adapter_format", default="ours", choices=ADAPTER_FORMATS,
                   help="epoch adapters: ours (rwkv-{epoch}.pth) or peft (HF PEFT folder rwkv-{epoch}/, "
                        "for --bone_mode col, miss and lora)")
    g.add_argument("--quant", default="none", choices=QUANT_TYPES,
                   help="store the frozen att/ffn linears quantised (bitsandbytes): nf4 / fp4 (4-bit, blocks "
                        "of 64) or int8 (per output row); adapters, emb, head, norms and time_* stay unquantised")
    g.add_argument("--train_parts", default="",
                   help="extra parts to train besides the adapter, comma separated: time, ln, emb, head")

    g = p.add_argument_group("hardware")
    g.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS),
                   help="bf16 (= bf16-mixed): frozen weights stored in bf16, trained tensors kept in fp32, "
                        "matmuls in bf16; fp32 (= 32, 32-true): everything fp32")
    g.add_argument("--accelerator", default="auto", choices=("auto", "gpu", "cuda", "cpu"), help="device type")
    g.add_argument("--devices", type=int, default=1, help="devices (processes) per node")
    g.add_argument("--num_nodes", type=int, default=1, help="nodes")
    g.add_argument("--strategy", default="auto", choices=STRATEGIES, help="distribution strategy")
    g.add_argument("--wkv_backend", default="auto", choices=WKV_BACKENDS,
                   help="WKV op: auto = our CUDA kernel, else fla's Triton kernels (pip install .[fla]), else the "
                        "chunked PyTorch path, each GPU kernel after its self-check; or force one")

    g = p.add_argument_group("run")
    g.add_argument("--proj_dir", default="out", help="output folder: checkpoints, logs, training state")
    g.add_argument("--random_seed", "--seed", type=int, default=42, help="seed: data order, init, dropout")
    g.add_argument("--wandb", default="", help="W&B project name (empty = off; offline without a W&B login)")
    g.add_argument("--resume", action="store_true", help="continue from PROJ_DIR's last saved training state")
    g.add_argument("--dry_run", action="store_true", help="print dims and trainable parameter count, then exit")
    g.add_argument("--progress", type=_bool01, default=True, help="show the progress bar")

    add_objective_args(p)

    g = p.add_argument_group("validation")
    g.add_argument("--valid_data", default="",
                   help="held-out data scored during training: a .jsonl (as for make_data / eval.py) or a "
                        "make_data binidx prefix with its mask; logs valid_loss / valid_ppl")
    g.add_argument("--valid_every", type=int, default=0,
                   help="validate every this many optimizer steps (0 = at every epoch end); always after the last")
    g.add_argument("--valid_task", default="none", choices=VALID_TASKS,
                   help="also log valid_acc, greedy accuracy as eval.py --task scores it (needs a .jsonl)")
    g.add_argument("--valid_limit", type=int, default=100, help="records scored for valid_acc")
    g.add_argument("--valid_max_tokens", type=int, default=256, help="new tokens per answer for valid_acc")
    g.add_argument("--valid_tokenizer", default="",
                   help="tokenizer for a .jsonl --valid_data: tokenizer.json or World vocab .txt (default World)")
    return p


def add_method_options(group) -> None:
    """One flag per option of the registry's methods (rwkv_bone/peft/options/), in table order."""
    for name, (field, kind) in registry.option_fields().items():
        choices = field.metadata["choices"]
        group.add_argument(f"--{name}", type=kind, default=field.default, help=field.metadata["help"],
                           **({} if choices is None else {"choices": choices}))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate(args)
    return args


def precision_mode(args: argparse.Namespace) -> str:
    """'bf16' or 'fp32'."""
    return PRECISIONS[args.precision]


def train_parts(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(x.strip() for x in args.train_parts.split(",") if x.strip())


def from_scratch(args: argparse.Namespace) -> bool:
    return args.load_model is not None and args.load_model == ""


def peft_options(args: argparse.Namespace) -> dict:
    """The settings of the chosen method (rwkv_bone.peft.registry) from its flags, for apply_peft /
    count_trainable; {} for --peft none."""
    if args.peft == "none":
        return {}
    method = registry.get_method(args.peft)
    return method.settings({k: getattr(args, k) for k in method.option_names})


def method_label(args: argparse.Namespace) -> str:
    """Short text naming the adapter, e.g. 'bone-row b=64', 'lora r=32'."""
    if args.peft == "none":
        return "full"
    return registry.get_method(args.peft).label(peft_options(args))


def _quant_methods() -> str:
    names = [n for n, m in registry.REGISTRY.items() if m.supports_quant]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def validate_valid_args(args: argparse.Namespace) -> None:
    """--valid_* combinations that cannot work."""
    if not args.valid_data:
        if args.valid_task != "none" or args.valid_every:
            raise UserError("--valid_every and --valid_task need --valid_data (a held-out .jsonl or binidx prefix)")
        return
    if args.valid_every < 0 or args.valid_limit < 1 or args.valid_max_tokens < 1:
        raise UserError("--valid_every must not be negative; --valid_limit and --valid_max_tokens must be at least 1")
    if args.valid_task != "none" and not args.valid_data.endswith(".jsonl"):
        raise UserError(f"--valid_task {args.valid_task} needs question/answer records: give --valid_data as a "
                        ".jsonl file (a binidx prefix holds only tokens, enough for the loss)")
    if args.strategy.startswith("deepspeed_stage_3"):
        raise UserError("--valid_data does not work with ZeRO stage 3 (the weights are sharded); use "
                        "deepspeed_stage_2, or score the saved adapter with eval.py")


def validate_method_options(args: argparse.Namespace) -> None:
    """Every method's option checks (rwkv_bone/peft/options/), whichever --peft is chosen: a bad
    value is refused even where this run ignores it."""
    values = vars(args)
    for options in registry.option_classes():
        options.from_options(values).check()


def validate(args: argparse.Namespace) -> None:
    """Flag combinations that can never work; each raises one UserError sentence."""
    positive = ["ctx_len", "micro_bsz", "accumulate_grad_batches", "epoch_steps", "epoch_count", "epoch_save",
                "devices", "num_nodes", "chunk_ctx"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("epoch_begin", "warmup_steps", "save_every_steps", "magic_prime", "my_exit_tokens",
                 "n_layer", "n_embd", "vocab_size"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("lr_init", "lr_final", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} {value} is not a finite number; give a plain number")
    validate_method_options(args)
    if args.lr_init is None:
        args.lr_init = DEFAULT_STATE_LR if args.peft == "state" else DEFAULT_LR
    if args.l2wrap is None:
        args.l2wrap = args.peft == "none"
    if args.lr_final is None:
        args.lr_final = args.lr_init
    if args.lr_init <= 0 or args.lr_final < 0:
        raise UserError("--lr_init must be positive and --lr_final not negative")
    if args.lr_schedule == "exp" and args.lr_final <= 0:
        raise UserError("--lr_schedule exp needs a positive --lr_final (it decays geometrically towards it)")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise UserError("--beta1 and --beta2 must lie in [0, 1)")
    if args.weight_decay < 0 or args.grad_clip < 0 or args.adam_eps <= 0:
        raise UserError("--weight_decay and --grad_clip must not be negative and --adam_eps must be positive")
    if args.adapter_format == "peft" and (args.peft == "none" or
                                          not registry.get_method(args.peft).peft_folder(peft_options(args))):
        what = f"--peft bone --bone_mode {args.bone_mode}" if args.peft == "bone" else f"--peft {args.peft}"
        raise UserError(f"--adapter_format peft exists for --bone_mode col, miss and lora, not {what}; "
                        "use --adapter_format ours")
    if args.adapter_format == "peft" and args.train_parts:
        raise UserError("--adapter_format peft holds adapter tensors only; drop --train_parts or use "
                        "--adapter_format ours")
    bad = [p for p in train_parts(args) if p not in TRAIN_PARTS]
    if bad:
        raise UserError(f"--train_parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(TRAIN_PARTS)}")

    explicit_dims = bool(args.n_layer or args.n_embd)
    if args.load_model is None and not (args.dry_run and (args.model_preset or explicit_dims)):
        raise UserError('give --load_model PATH to fine-tune a checkpoint, or --load_model "" with '
                        '--model_preset (or --n_layer and --n_embd) to train from scratch')
    if args.load_model:
        if explicit_dims or args.vocab_size:
            raise UserError("--n_layer/--n_embd/--vocab_size are read from the --load_model checkpoint; "
                            "drop them (they are only for training from scratch)")
        if args.model_preset:
            raise UserError("--model_preset is only for training from scratch or --dry_run; the dims of "
                            "--load_model are read from the checkpoint, so drop --model_preset")
        if os.path.isdir(args.load_model):
            raise UserError(f"--load_model {args.load_model} is a folder; give the path of the RWKV-6 .pth file itself")
        if not os.path.isfile(args.load_model):
            raise UserError(f"--load_model {args.load_model} does not exist; give the path of an RWKV-6 .pth file")
    else:
        if args.model_preset and explicit_dims:
            raise UserError("give either --model_preset or --n_layer/--n_embd, not both")
        if not args.model_preset and not (args.n_layer and args.n_embd):
            raise UserError('training from scratch (--load_model "") needs --model_preset (1.6b, 3b, 7b, 14b) '
                            "or both --n_layer and --n_embd")
        if from_scratch(args) and args.peft != "none":
            raise UserError(f'--load_model "" trains a new model from scratch, where every weight trains: '
                            f"use --peft none (adapters such as --peft {args.peft} need a pre-trained --load_model)")
    if args.layerwise_lr and args.peft != "none" and "time" not in train_parts(args):
        raise UserError("--layerwise_lr 1 doubles the lr of the time_decay tensors, which train only with "
                        "--train_parts time (or --peft none); add --train_parts time or drop --layerwise_lr")
    if args.quant != "none" and args.peft != "none" and not registry.get_method(args.peft).supports_quant:
        raise UserError(f"--quant {args.quant} runs the adapters of --peft {_quant_methods()} on a "
                        f"quantised base; --peft {args.peft} does not support it yet, so drop --quant or "
                        "use one of those methods")
    if args.quant != "none" and args.peft == "none":
        raise UserError(f"--quant {args.quant} stores the frozen base quantised, but with --peft none every "
                        "weight trains; use an adapter (e.g. --peft bone) with --quant, or drop --quant")
    if args.peft == "none" and args.train_parts and not from_scratch(args):
        raise UserError("--train_parts only adds parts to an adapter; with --peft none every weight trains already")

    if args.dry_run:
        return
    validate_valid_args(args)
    if not args.data_file:
        raise UserError("--data_file is required: the binidx prefix (PREFIX.bin / PREFIX.idx, without extension)")
    validate_objective(args)
    if args.sft_pack and args.data_type != "sft":
        raise UserError("--sft_pack 1 packs sft documents; it needs --data_type sft")
    if args.magic_prime and args.data_type == "sft":
        raise UserError("--magic_prime applies to --data_type binidx only; sft takes one document per sample")
    if args.strategy == "auto" and args.devices * args.num_nodes > 1:
        args.strategy = "ddp"

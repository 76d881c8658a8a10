"""One training run from parsed flags: data, model (+ adapters), Lightning Trainer, resume, dry run.

Precision (--precision):
- bf16 (default; "bf16-mixed" is the same): frozen base weights are stored in bf16 (2 bytes per
  weight: a 7B base takes ~15 GB), the tensors that train stay fp32 masters, matmuls run in bf16
  (torch.autocast; under DeepSpeed its bf16 mode, which keeps fp32 master copies of what trains).
- fp32 ("32", "32-true"): everything fp32 (CPU runs, exact-reproducibility tests).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from . import args as A
from . import checkpoints as ck
from .callbacks import MetricsLogger, write_run_settings
from .config import TrainConfig
from .saver import Saver, epoch_file
from .strategy import DEEPSPEED_STAGES, build_strategy, is_deepspeed, resolve_accelerator


from .plan import count_params, describe, dry_run, load_base, model_config  # noqa: E402,F401


def build_model(args: argparse.Namespace, config, bf16: bool, base_sd: dict | None = None) -> torch.nn.Module:
    """The model to train; `base_sd` is --load_model's state dict when already read (load_base)."""
    from ..model import RWKV6
    from ..peft import apply_peft, mark_trainable

    if A.from_scratch(args):
        torch.manual_seed(args.random_seed)
        model = RWKV6.from_config(config, device="cpu")  # reference init, all fp32, everything trains
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        # A bf16 base is never copied to fp32 as a whole (PiSSA/OLoRA factorise one layer at a time
        # in fp32 and write W_res back in bf16), so host memory stays at 2 bytes per weight.
        if base_sd is None:
            base_sd = load_base(args)[1]
        model = RWKV6.from_state_dict(base_sd, dtype=torch.bfloat16 if bf16 else torch.float32)
        if args.peft == "none":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            torch.manual_seed(args.random_seed)
            apply_peft(model, args.peft, **A.peft_options(args))
            mark_trainable(model, A.train_parts(args))
            if args.quant != "none":  # after apply_peft: PiSSA/OLoRA quantise W_res (QPiSSA)
                from ..peft.inject import quantize_frozen

                quantize_frozen(model, args.quant)
    cast_for_training(model, bf16)
    model.grad_cp = bool(args.grad_cp)
    return model


@torch.no_grad()
def cast_for_training(model: torch.nn.Module, bf16: bool) -> None:
    """What trains stays fp32 (DeepSpeed bf16 keeps its own fp32 masters); with bf16, frozen
    weights shrink to bf16."""
    for p in model.parameters():
        want = torch.float32 if (p.requires_grad or not bf16) else torch.bfloat16
        if p.dtype != want:
            p.data = p.data.to(want)


def _env_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@dataclass
class TrainRun:
    trainer: Any  # pl.Trainer
    module: Any  # RWKVTrainModule
    saver: Saver
    cfg: TrainConfig


def run(args: argparse.Namespace) -> int:
    """train.py's whole job: dry run, or build and fit; 1 when the loss stops being finite."""
    if args.dry_run:
        return dry_run(args)
    tr = build_run(args)
    return 0 if tr is None else fit_run(tr)


def fit_run(tr: TrainRun) -> int:
    """Fit; 1 when the loss stops being finite, 130 on Ctrl-C (naming the state to --resume from)."""
    from .module import NonFiniteLoss

    try:
        tr.trainer.fit(tr.module)
    except NonFiniteLoss as e:
        print(f"error: {e}", flush=True)
        return 1
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if not tr.saver.interrupted:
            raise
        if _env_rank_zero():
            print(tr.saver.interrupted_message(), file=sys.stderr, flush=True)
        return 130
    if tr.trainer.is_global_zero and tr.saver.saved_epochs:
        name = epoch_file(max(tr.saver.saved_epochs), tr.saver.adapter_format)
        print(f"saved {os.path.join(tr.cfg.run.proj_dir, name)}")
    return 0


def quiet_lightning() -> None:
    """Lightning's start-up lines (GPU/TPU available, the LitLogger/litmodels "Tip", "initializing
    (deepspeed) distributed", "`Trainer.fit` stopped") are info-level logs; warnings and errors still show."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning",
                 "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_proj_dir(proj_dir: str) -> None:
    """Create --proj_dir, or refuse one that is a file / cannot be created or written."""
    if os.path.exists(proj_dir) and not os.path.isdir(proj_dir):
        raise UserError(f"--proj_dir {proj_dir} is an existing file, not a folder; choose another --proj_dir")
    try:
        os.makedirs(proj_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --proj_dir {proj_dir} ({e.strerror}); choose another folder") from None
    if not os.access(proj_dir, os.W_OK):
        raise UserError(f"--proj_dir {proj_dir} is not writable; choose another folder")


def remove_stale_temporaries(proj_dir: str) -> None:
    """Temporary siblings (.NAME.tmpPID) left by a run killed while writing; the real files are intact."""
    for name in os.listdir(proj_dir):
        if name.startswith(".") and ".tmp" in name and os.path.isfile(os.path.join(proj_dir, name)):
            os.remove(os.path.join(proj_dir, name))


@dataclass(frozen=True)
class RunPlan:
    """Hardware and length of a run, from the flags alone."""
    accelerator: str  # "gpu" or "cpu"
    deepspeed_on: bool
    bf16: bool
    world_size: int
    tokens_per_step: int
    total_steps: int


def plan_run(cfg: TrainConfig) -> RunPlan:
    accelerator = resolve_accelerator(cfg.hardware.accelerator)
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu was requested but CUDA is not available; use --accelerator cpu")
    d, world_size = cfg.data, cfg.hardware.world_size
    tokens_per_step = d.micro_bsz * d.accumulate_grad_batches * world_size * d.ctx_len
    total_steps = cfg.run.epoch_count * cfg.run.epoch_steps
    if cfg.run.my_exit_tokens:
        total_steps = min(total_steps, math.ceil(cfg.run.my_exit_tokens / tokens_per_step))
    return RunPlan(accelerator, is_deepspeed(cfg.hardware.strategy), cfg.hardware.bf16, world_size,
                   tokens_per_step, total_steps)


def find_resume(args: argparse.Namespace, plan: RunPlan) -> dict | None:
    """The saved state --resume continues from (checked against these flags), or None without --resume."""
    if not args.resume:
        return None
    info = ck.find_state(args.proj_dir, plan.deepspeed_on)
    ck.check_resume_settings(info.get("settings", {}), args)
    if info.get("world_size", plan.world_size) != plan.world_size:
        raise UserError(f"--resume: the saved run used {info['world_size']} processes "
                        f"(--devices x --num_nodes) but this one has {plan.world_size}; resume with the same count")
    return info


def announce(args: argparse.Namespace, cfg: TrainConfig, plan: RunPlan, config, model, start_step: int) -> None:
    """Rank 0: clear stale temporaries, write run.json, print the run's facts."""
    proj_dir = cfg.run.proj_dir
    remove_stale_temporaries(proj_dir)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_name = cfg.model.model_preset or f"L{config.n_layer}-D{config.n_embd}"
    write_run_settings(args, os.path.join(proj_dir, "run.json"),
                       {"model": model_name, "trainable_params": n_train, "total_steps": plan.total_steps,
                        "tokens_per_step": plan.tokens_per_step})
    print(f"model: {describe(config)}; method: {A.method_label(args)}; trainable parameters: {n_train:,}")
    from ..quant import frozen_weight_bytes

    frozen, kinds = frozen_weight_bytes(model)
    print(f"frozen weights: {frozen / 2**20:.1f} MB ({kinds})")
    print(f"steps {start_step} -> {plan.total_steps}, {plan.tokens_per_step:,} tokens per step, "
          f"strategy {cfg.hardware.strategy} on {plan.accelerator}, precision {A.precision_mode(args)}")


def build_trainer(cfg: TrainConfig, plan: RunPlan, callbacks: list, start_step: int):
    import pytorch_lightning as pl

    h = cfg.hardware
    return pl.Trainer(
        accelerator=plan.accelerator,
        devices=h.devices,
        num_nodes=h.num_nodes,
        strategy=build_strategy(h.strategy, plan.accelerator),
        precision=("bf16-mixed" if plan.bf16 else "32-true") if plan.deepspeed_on else "32-true",
        max_steps=plan.total_steps - start_step,
        max_epochs=1,
        accumulate_grad_batches=cfg.data.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.run.progress),
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def build_run(args: argparse.Namespace) -> TrainRun | None:
    """Check the data, load the model (+ adapters, + resumed state), build the Trainer; None when a
    resumed run has nothing left to do."""
    from .data import check_data_prefix, check_token_ids, open_sampler
    from .module import RWKVTrainModule

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    quiet_lightning()
    cfg = TrainConfig.from_args(args)
    plan = plan_run(cfg)
    d = cfg.data

    # Everything that can be refused is refused before the first file is written.
    config, base_sd = load_base(args)
    if cfg.objective.objective == "grpo":  # prompts from a .jsonl, read again by the objective
        from ..eval.records import load_records

        load_records(d.data_file)  # a bad record is refused before anything is written
        sampler = None
    else:
        check_data_prefix(d.data_file)
        sampler = open_sampler(d.data_file, d.data_type, d.ctx_len, cfg.run.random_seed, d.magic_prime,
                               sft_pack=d.sft_pack)
        check_token_ids(d.data_file, config.vocab_size)
    prepare_proj_dir(cfg.run.proj_dir)
    resume_info = find_resume(args, plan)
    start_step = int(resume_info["step"]) if resume_info is not None else 0
    if start_step >= plan.total_steps:
        print(f"the run in {cfg.run.proj_dir} already finished all {plan.total_steps} steps; nothing to do")
        return None

    quant = cfg.method["quant"]
    if quant != "none":
        from ..quant import check_device_support

        check_device_support(quant, "cuda" if plan.accelerator == "gpu" else "cpu")
    model = build_model(args, config, plan.bf16, base_sd)
    del base_sd  # the model holds what it needs; drop the rest of the mapping
    from .objectives.build import build_objective

    # Before a resumed state loads: the reference snapshot is the adapter's start (or, for --peft
    # none, the fingerprint of the base whose log-probs the stored reference holds).
    stored = None
    if cfg.objective.objective == "dpo" and cfg.method["peft"] == "none":
        from ..data.binidx import split_prefix
        from .objectives.stored import StoredReference, fingerprint

        stored = StoredReference(cfg.run.proj_dir, fingerprint(split_prefix(d.data_file), d.ctx_len,
                                                               A.precision_mode(args), model),
                                 resume=resume_info is not None)
    objective = build_objective(cfg.objective, cfg.run.random_seed, d.data_file, model, stored)
    if objective is not None and sampler is None:
        from .data import PromptOrder

        sampler = PromptOrder(len(objective.records), cfg.run.random_seed, cfg.objective.grpo_iterations,
                              d.micro_bsz * d.accumulate_grad_batches * plan.world_size)
    optimizer_state = None
    if resume_info is not None and resume_info["kind"] == "plain":
        ck.load_plain_trainables(model, resume_info)
        optimizer_state = resume_info["optimizer"]
    if _env_rank_zero():
        announce(args, cfg, plan, config, model, start_step)

    offload = plan.deepspeed_on and DEEPSPEED_STAGES[cfg.hardware.strategy][1]
    module = RWKVTrainModule(model, cfg.optim, d, seed=cfg.run.random_seed, start_step=start_step,
                             total_steps=plan.total_steps, optimizer_state=optimizer_state, offload_optimizer=offload,
                             autocast_bf16=plan.bf16 and not plan.deepspeed_on)
    module.sampler = sampler
    module.objective = objective
    run_name = f"rwkv6-{cfg.model.model_preset or f'L{config.n_layer}-D{config.n_embd}'} " \
               f"{A.method_label(args)} ctx{d.ctx_len}"
    metrics = MetricsLogger(cfg.run, d, flags=cfg.as_dict(), start_step=start_step, total_steps=plan.total_steps,
                            tokens_per_step=plan.tokens_per_step, run_name=run_name, resume_info=resume_info)
    saver = Saver(cfg.run, d, cfg.model, metrics=metrics, settings=cfg.as_namespace(),
                  adapter_format=cfg.method["adapter_format"], start_step=start_step, total_steps=plan.total_steps,
                  tokens_per_step=plan.tokens_per_step, deepspeed_on=plan.deepspeed_on,
                  full_model=cfg.method["peft"] == "none", resume_info=resume_info,
                  full_dtype=torch.bfloat16 if plan.bf16 else torch.float32)
    saver.init_factors = ck.init_factor_buffers(model)
    callbacks: list = [metrics, saver]  # the saver records the losses the logger has just averaged
    if cfg.valid.valid_data:
        from .validate import Validator

        # Before the logger, which writes its numbers.
        callbacks.insert(0, Validator(cfg.valid, d, cfg.run, plan.total_steps))
    trainer = build_trainer(cfg, plan, callbacks, start_step)
    return TrainRun(trainer, module, saver, cfg)

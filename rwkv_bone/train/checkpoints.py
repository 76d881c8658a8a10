"""Crash-safe files of a run: epoch checkpoints (rwkv-{epoch}.pth) and the resumable training state.

Every file is written to a temporary sibling, flushed to disk, then os.replace'd over its name, so a
run killed at any moment (even kill -9) leaves either the old or the new file, never a truncated one.

- rwkv-{epoch}.pth: only the trained tensors in the adapter format of rwkv_bone.peft (save_adapter;
  merge.py reads it), or, with --peft none (from scratch or full fine-tuning), the whole model in
  the official layout (bf16 with --precision bf16, like released checkpoints).
  Under DeepSpeed the tensors are DeepSpeed's fp32 master copies, gathered from every rank
  (ZeRO-3 partitions included) and written by rank 0 alone.
- training state, what --resume needs, besides the flags (the data order, learning rate and dropout
  are pure functions of the step):
  * without DeepSpeed: PROJ_DIR/last-state.pth = {step, trained tensors, AdamW state, epoch loss sums};
  * with DeepSpeed: DeepSpeed's own (per-rank, sharded) checkpoint of the trained tensors and
    optimizer in PROJ_DIR/state/step-N, written into step-N.tmp and renamed when complete, and
    PROJ_DIR/last-state.json naming the newest complete one (replaced atomically, then old ones go).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import torch

from ..atomic import text_atomic, torch_save_atomic
from ..errors import UserError
from ..peft.registry import option_names
from .strategy import full_fp32_param

STATE_FILE = "last-state.pth"
STATE_POINTER = "last-state.json"
STATE_DIR = "state"
STATE_FORMAT = "rwkv-bone-train-state"
# Flags that must not change between a run and its resumption (they change the data or the model):
# these, plus every option of every fine-tuning method (the fields of the registry's options
# classes, lora_alpha included), whichever method the run uses.
# --epoch_count may grow (train longer; a decaying lr schedule then spans the new length).
BASE_RESUME_KEYS = ("data_file", "data_type", "ctx_len", "micro_bsz", "accumulate_grad_batches", "epoch_steps",
                    "random_seed", "peft", "train_parts", "magic_prime", "load_model", "layerwise_lr", "sft_pack",
                    "quant")


def resume_keys() -> tuple[str, ...]:
    return BASE_RESUME_KEYS + tuple(k for k in option_names() if k not in BASE_RESUME_KEYS)


def trained_tensors(model: torch.nn.Module, deepspeed_on: bool) -> dict[str, torch.Tensor]:
    """{parameter name: complete fp32 CPU tensor} of every parameter that trains (collective under DeepSpeed)."""
    return {n: full_fp32_param(p, deepspeed_on) for n, p in model.named_parameters() if p.requires_grad}


def init_factor_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the PiSSA/OLoRA initial factors (init_A, init_B), taken before DeepSpeed's bf16
    mode casts every buffer: the adapter file must hold the exact A0, B0 that W_res = W - B0 A0 used."""
    return {n: b.detach().float().cpu().clone() for n, b in model.named_buffers()
            if n.endswith((".init_A", ".init_B"))}


def save_epoch_checkpoint(path: str, model: torch.nn.Module, *, deepspeed_on: bool, is_rank0: bool,
                          full_model: bool, full_dtype: torch.dtype, extra_meta: dict,
                          init_factors: dict[str, torch.Tensor] | None = None,
                          adapter_format: str = "ours") -> None:
    """Write rwkv-{epoch}.pth (every rank must call this under DeepSpeed)."""
    values = trained_tensors(model, deepspeed_on)
    if not is_rank0:
        return
    if full_model:
        sd = {}
        for k, t in model.state_dict().items():
            v = values.get(k, t)
            sd[k] = v.detach().to(device="cpu", dtype=full_dtype if v.is_floating_point() else v.dtype).contiguous()
        torch_save_atomic(sd, path)
        return
    from ..peft import save_adapter

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    values.update(init_factors or {})
    swapped = {}
    try:
        # save_adapter reads the module's tensors: show it the fp32 values (DeepSpeed masters) meanwhile.
        for name, value in values.items():
            swapped[name] = tensors[name].data
            tensors[name].data = value
        save_adapter(model, path, extra_meta=extra_meta, format=adapter_format)
    finally:
        for name, old in swapped.items():
            tensors[name].data = old


def resume_settings(args) -> dict:
    out = {k: getattr(args, k) for k in resume_keys()}
    for k in ("data_file", "load_model"):  # the same file named another way is the same file
        if out[k]:
            out[k] = os.path.abspath(out[k])
    return out


def check_resume_settings(saved: dict, args) -> None:
    now = resume_settings(args)
    for k in resume_keys():
        if k in saved and saved[k] != now[k]:   # states saved before a key joined the keys lack it
            was = f"--{k} {saved[k]!r}" if saved[k] is not None else f"no --{k} (the default)"
            has = repr(now[k]) if now[k] is not None else f"no --{k}"
            raise UserError(f"--resume: the saved run used {was} but this one has {has}; "
                            f"resume with the same --{k} (or start a new run in another --proj_dir)")


# ---- plain (single process / DDP) training state ---------------------------------------------
def save_plain_state(proj_dir: str, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     epoch_loss: tuple[float, int], args) -> None:
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "epoch_loss": list(epoch_loss),
        "settings": resume_settings(args),
        "world_size": args.devices * args.num_nodes,
    }
    torch_save_atomic(state, os.path.join(proj_dir, STATE_FILE))


def find_state(proj_dir: str, deepspeed_on: bool) -> dict:
    """What --resume continues from: {'step', 'epoch_loss', ...}; raises UserError when there is none."""
    plain, pointer = os.path.join(proj_dir, STATE_FILE), os.path.join(proj_dir, STATE_POINTER)
    if deepspeed_on:
        if not os.path.isfile(pointer):
            other = " (there is a non-DeepSpeed state: resume with that --strategy)" if os.path.isfile(plain) else ""
            raise UserError(f"--resume: no DeepSpeed training state in {proj_dir} ({STATE_POINTER}){other}; "
                            "start without --resume or point --proj_dir at the run to continue")
        try:
            with open(pointer) as f:
                info = json.load(f)
            ok = isinstance(info, dict) and info.get("format") == STATE_FORMAT and "tag" in info and "step" in info
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"--resume: {pointer} is not a readable rwkv-bone training state; start without --resume")
        info["kind"] = "deepspeed"
        return info
    if not os.path.isfile(plain):
        other = " (there is a DeepSpeed state: resume with a deepspeed --strategy)" if os.path.isfile(pointer) else ""
        raise UserError(f"--resume: no training state in {proj_dir} ({STATE_FILE}){other}; "
                        "start without --resume or point --proj_dir at the run to continue")
    try:
        state = torch.load(plain, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"--resume: {plain} is not a readable training state; start without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or \
            not all(k in state for k in ("step", "trainable", "optimizer")):
        raise UserError(f"--resume: {plain} is not a rwkv-bone training state; start without --resume")
    state["kind"] = "plain"
    return state


def load_plain_trainables(model: torch.nn.Module, state: dict) -> None:
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    if sorted(trained) != sorted(state["trainable"]):
        raise UserError("--resume: the saved training state holds different trained tensors than this model "
                        "(another --peft / --train_parts?); resume with the original flags")
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)


# ---- DeepSpeed training state ------------------------------------------------------------------
def save_deepspeed_state(proj_dir: str, engine, *, step: int, epoch_loss: tuple[float, int], args,
                         is_rank0: bool, barrier: Callable[[], None]) -> None:
    """Collective: every rank writes its shard into state/step-N.tmp; rank 0 then publishes it."""
    root = os.path.join(proj_dir, STATE_DIR)
    tag = f"step-{step:09d}"
    tmp_tag = tag + ".tmp"
    if is_rank0:
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    barrier()
    engine.save_checkpoint(root, tag=tmp_tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    barrier()
    if is_rank0:
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(os.path.join(root, tmp_tag), final)
        info = {"format": STATE_FORMAT, "step": step, "tag": tag, "epoch_loss": list(epoch_loss),
                "settings": resume_settings(args), "world_size": args.devices * args.num_nodes}
        text_atomic(json.dumps(info, indent=1), os.path.join(proj_dir, STATE_POINTER))
        for old in os.listdir(root):
            if old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()


def load_deepspeed_state(proj_dir: str, engine, info: dict) -> None:
    load_path, _ = engine.load_checkpoint(os.path.join(proj_dir, STATE_DIR), tag=info["tag"],
                                          load_module_strict=False, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise UserError(f"--resume: DeepSpeed could not read {os.path.join(proj_dir, STATE_DIR, info['tag'])}; "
                        "start without --resume")

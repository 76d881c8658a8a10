"""What a run saves: epoch adapters (rwkv-{epoch}.pth, or the HF PEFT folder rwkv-{epoch}/), the
resumable training state (train/checkpoints.py writes the files) and, on Ctrl-C, the line naming it.

Rank 0 writes the plain files; under DeepSpeed, gathering ZeRO tensors and saving its state are
collective, so every rank runs them. The Saver is listed after the MetricsLogger, whose step and
epoch losses it records.
"""
from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch

from . import checkpoints as ck
from .callbacks import MetricsLogger, epoch_end
from .config import DataConfig, ModelConfig, RunConfig


def epoch_file(epoch: int, adapter_format: str = "ours") -> str:
    """rwkv-{epoch}.pth, or the HF PEFT folder rwkv-{epoch} with --adapter_format peft."""
    return f"rwkv-{epoch}" if adapter_format == "peft" else f"rwkv-{epoch}.pth"


class Saver(pl.Callback):
    def __init__(self, run: RunConfig, data: DataConfig, model: ModelConfig, *, metrics: MetricsLogger,
                 settings: argparse.Namespace, adapter_format: str, start_step: int, total_steps: int,
                 tokens_per_step: int, deepspeed_on: bool, full_model: bool, resume_info: dict | None,
                 full_dtype: torch.dtype) -> None:
        self.run, self.data, self.model_source = run, data, model
        self.metrics = metrics  # the step and epoch losses
        self.settings = settings  # the flags, recorded in the state for --resume's checks
        self.adapter_format = adapter_format
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.deepspeed_on, self.full_model = deepspeed_on, full_model  # full_model: --peft none
        self.resume_info = resume_info
        self.full_dtype = full_dtype
        self.init_factors: dict[str, torch.Tensor] = {}  # fp32 PiSSA/OLoRA A0, B0 (see checkpoints)
        self.saved_epochs: set[int] = set()
        # The state of step k is written once step k+1's loss is known to be finite (see save_state).
        self.pending_state: tuple[int, tuple[float, int]] | None = None
        self.saved_state_step: int | None = int(resume_info["step"]) if resume_info else None
        self.interrupted = False  # Ctrl-C (KeyboardInterrupt) seen by on_exception
        self.last_step = start_step

    def path(self, name: str) -> str:
        return os.path.join(self.run.proj_dir, name)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.resume_info and self.resume_info["kind"] == "deepspeed":
            ck.load_deepspeed_state(self.run.proj_dir, trainer.strategy.deepspeed_engine, self.resume_info)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.data.accumulate_grad_batches:
            return
        step = pl_module.start_step + trainer.global_step  # optimizer steps done, 1-based index of this one
        self.last_step = step
        at_epoch_end = epoch_end(step, self.run.epoch_steps, self.total_steps)
        if at_epoch_end:
            epoch = self.run.epoch_of(step)
            index = epoch - self.run.epoch_begin  # 0-based epoch of this run
            if (index + 1) % self.run.epoch_save == 0 or step == self.total_steps:
                self.save_epoch(trainer, pl_module, epoch, step, self.metrics.epoch_mean)
        every = self.run.save_every_steps
        if at_epoch_end or (every and step % every == 0):
            self.save_state(trainer, pl_module, step)
        self.metrics.restart_clock()  # checkpoint time does not count against kt/s

    def save_epoch(self, trainer, pl_module, epoch: int, step: int, loss: float) -> None:
        meta = {"epoch": epoch, "step": step, "loss": loss, "tokens": step * self.tokens_per_step,
                "ctx_len": self.data.ctx_len, "load_model": self.model_source.load_model}
        fmt = self.adapter_format
        ck.save_epoch_checkpoint(self.path(epoch_file(epoch, fmt)), pl_module.model, deepspeed_on=self.deepspeed_on,
                                 is_rank0=trainer.is_global_zero, full_model=self.full_model,
                                 full_dtype=self.full_dtype, extra_meta=meta, init_factors=self.init_factors,
                                 adapter_format=fmt)
        self.saved_epochs.add(epoch)

    def save_state(self, trainer, pl_module, step: int) -> None:
        """The resumable state after step k is only written once step k+1's forward pass gave a
        finite loss (on_before_backward, weights and optimizer still those of step k): after a
        divergence the kept state is one whose forward pass is finite, so --resume with a lower lr
        continues. The last step of the run is written at once."""
        epoch_loss = self.metrics.epoch_loss
        if step >= self.total_steps:
            self.pending_state = None
            self.write_state(trainer, pl_module, step, epoch_loss)
        else:
            self.pending_state = (step, epoch_loss)

    def on_before_backward(self, trainer: pl.Trainer, pl_module, loss) -> None:
        if self.pending_state is None:
            return
        step, epoch_loss = self.pending_state
        self.pending_state = None
        # One host sync, only on the step after a save: the module checks finiteness later (once
        # per optimizer step), but the state of step k must not be written if this loss is not.
        bad = (~torch.isfinite(loss.detach())).float()
        if trainer.world_size > 1:  # every rank decides alike (saving is collective under ZeRO)
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() == 0:
            self.write_state(trainer, pl_module, step, epoch_loss)

    def write_state(self, trainer, pl_module, step: int, epoch_loss: tuple[float, int]) -> None:
        if self.deepspeed_on:
            ck.save_deepspeed_state(self.run.proj_dir, trainer.strategy.deepspeed_engine, step=step,
                                    epoch_loss=epoch_loss, args=self.settings, is_rank0=trainer.is_global_zero,
                                    barrier=trainer.strategy.barrier)
        elif trainer.is_global_zero:
            ck.save_plain_state(self.run.proj_dir, step=step, model=pl_module.model,
                                optimizer=trainer.optimizers[0], epoch_loss=epoch_loss, args=self.settings)
        self.saved_state_step = step

    def interrupted_message(self) -> str:
        """One line for Ctrl-C: where the state to --resume from is, or that there is none yet."""
        where = os.path.join(self.run.proj_dir, ck.STATE_POINTER if self.deepspeed_on else ck.STATE_FILE)
        if self.saved_state_step is None:
            return (f"interrupted at step {self.last_step}, before any training state was saved; "
                    "nothing to resume, start the run again")
        return (f"interrupted at step {self.last_step}; the training state of step {self.saved_state_step} "
                f"is in {where}: rerun the same command with --resume to continue")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.pending_state is not None:  # no further step ran: the weights are still step k's
            step, epoch_loss = self.pending_state
            self.pending_state = None
            self.write_state(trainer, pl_module, step, epoch_loss)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self.interrupted = isinstance(exception, KeyboardInterrupt)

"""The LightningModule: RWKV-6 (+ adapters), next-token cross-entropy, AdamW on what trains.

loss = mean over trained positions t of -log softmax(logits_t)[y_t], logits taken in fp32;
with an sft loss mask m (1 = response token) it is sum_t m_t * l_t / max(1, sum_t m_t)
(rwkv_bone.train.loss: by default in token chunks, so the (B, T, V) logits never exist whole).

The learning rate is set from `schedule.lr_at(step)` before every micro-batch and dropout draws
from a generator re-seeded from (seed, step, rank, micro-batch), so nothing random or stateful
lives outside (trained tensors, optimizer state, step) and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import StepSamples
from .infctx import infctx_loss
from .loss import chunked_token_loss, token_loss  # noqa: F401  (token_loss: re-exported)
from .schedule import lr_at


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; weight decay (when > 0) on tensors with 2+ dims only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if weight_decay > 0 and p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class RWKVTrainModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, args, *, start_step: int, total_steps: int,
                 optimizer_state: dict | None = None, offload_optimizer: bool = False,
                 autocast_bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.args = args
        self.start_step = start_step  # optimizer steps done before this process started
        self.total_steps = total_steps
        self.optimizer_state = optimizer_state  # resume (non-DeepSpeed): loaded into AdamW once built
        self.offload_optimizer = offload_optimizer
        self.autocast_bf16 = autocast_bf16
        self.last_loss = float("nan")
        self.sampler = None  # g -> sample (rwkv_bone.train.data); set before fit

    def train_dataloader(self) -> DataLoader:
        a = self.args
        ds = StepSamples(self.sampler, start_step=self.start_step, total_steps=self.total_steps,
                         rank=self.global_rank, world_size=self.trainer.world_size,
                         accumulate=a.accumulate_grad_batches, micro_bsz=a.micro_bsz)
        return DataLoader(ds, batch_size=a.micro_bsz, shuffle=False, num_workers=0, drop_last=False)

    @property
    def step(self) -> int:
        """Optimizer steps done so far in the whole run (0-based index of the step in progress)."""
        return self.start_step + self.trainer.global_step

    def current_lr(self) -> float:
        a = self.args
        return lr_at(self.step, self.total_steps, a.lr_init, a.lr_final, a.lr_schedule, a.warmup_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = self.current_lr()
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        micro = batch_idx % self.args.accumulate_grad_batches
        # Dropout (LoRA) randomness as a pure function of the position in the run.
        torch.manual_seed(hash((self.args.random_seed, self.step, self.global_rank, micro)) % (2**63))
        x, y = batch[0], batch[1]  # (B, T) int64 each
        mask = batch[2] if len(batch) > 2 else None  # (B, T) float32, sft only
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.batch_loss(x, y, mask)
        value = loss.item()
        bad = torch.tensor(0.0 if math.isfinite(value) else 1.0, device=loss.device)
        if self.trainer.world_size > 1:  # every rank stops together
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            shown = value if not math.isfinite(value) else "non-finite on another rank"
            raise NonFiniteLoss(
                f"the loss became {shown} at step {self.step + 1}, so training stopped; the checkpoints "
                "already written are kept - lower --lr_init (and keep --grad_clip on) and restart"
            )
        self.last_loss = float(value)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        return loss

    def batch_loss(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        """Scalar fp32 loss of one micro-batch (--chunked_ce: never the whole (B, T, V) logits)."""
        a = self.args
        l2wrap = bool(getattr(a, "l2wrap", False))
        if getattr(a, "train_type", "none") == "infctx":
            return infctx_loss(self.model, x, y, mask, a.chunk_ctx, l2wrap=l2wrap)
        if getattr(a, "chunked_ce", True):
            h, _ = self.model.forward_features(x)  # (B, T, C)
            return chunked_token_loss(self.model.head, h, y, mask, l2wrap=l2wrap)
        return token_loss(self.model(x), y, mask, l2wrap=l2wrap)

    def configure_optimizers(self):
        a = self.args
        groups = optimizer_groups(self.model, a.weight_decay)
        if not groups:
            raise RuntimeError("no trainable parameters")
        if self.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=a.lr_init, betas=(a.beta1, a.beta2), eps=a.adam_eps,
                                   adamw_mode=True)
        else:
            opt = torch.optim.AdamW(groups, lr=a.lr_init, betas=(a.beta1, a.beta2), eps=a.adam_eps,
                                    weight_decay=0.0)  # per-group weight_decay overrides this
        if self.optimizer_state is not None:
            opt.load_state_dict(self.optimizer_state)
            self.optimizer_state = None
        return opt

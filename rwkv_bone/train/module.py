"""The LightningModule: RWKV-6 (+ adapters), next-token cross-entropy, AdamW on what trains.

loss = mean over trained positions t of -log softmax(logits_t)[y_t], logits taken in fp32;
with an sft loss mask m (1 = response token) it is sum_t m_t * l_t / max(1, sum_t m_t)
(rwkv_bone.train.loss: by default in token chunks, so the (B, T, V) logits never exist whole).

The learning rate is set from `schedule.lr_at(step)` (times each group's lr_scale, see
optimizer_groups) before every micro-batch and dropout draws from a generator re-seeded from
(seed, step, rank, micro-batch), so nothing random or stateful lives outside (trained tensors,
optimizer state, step) and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .config import DataConfig, OptimConfig
from .data import StepSamples
from .infctx import infctx_loss
from .loss import chunked_token_loss, fused_token_loss, token_loss, uses_fused_loss  # noqa: F401  (token_loss: re-exported)
from .schedule import lr_at


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


# --layerwise_lr 1: RWKV-LM's x060 groups. Tensors whose name contains this (time_decay,
# time_decay_w1, time_decay_w2) train at LAYERWISE_SCALE x the scheduled lr; the rest at 1x.
LAYERWISE_KEY = "time_decay"
LAYERWISE_SCALE = 2.0


def optimizer_groups(model: torch.nn.Module, weight_decay: float,
                     layerwise_lr: bool = False) -> list[dict[str, Any]]:
    """Trainable parameters only; weight decay (when > 0) on tensors with 2+ dims only.

    Every group carries "lr_scale", its multiplier of the scheduled lr (on_train_batch_start sets
    group lr = lr_at(step) * lr_scale). 1x groups come first, so param_groups[0] holds the base lr.
    """
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = LAYERWISE_SCALE if layerwise_lr and LAYERWISE_KEY in name else 1.0
            buckets.setdefault((scale, weight_decay > 0 and p.dim() >= 2), []).append(p)
    return [{"params": buckets[key], "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": key[0]}
            for key in sorted(buckets, key=lambda k: (k[0], not k[1]))]


class RWKVTrainModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, optim: OptimConfig, data: DataConfig, *, seed: int,
                 start_step: int, total_steps: int, optimizer_state: dict | None = None,
                 offload_optimizer: bool = False, autocast_bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.optim = optim  # lr schedule, AdamW, loss options (rwkv_bone.train.config)
        self.data = data  # micro-batch and accumulation
        self.seed = seed  # --random_seed: dropout draws
        self.start_step = start_step  # optimizer steps done before this process started
        self.total_steps = total_steps
        self.optimizer_state = optimizer_state  # resume (non-DeepSpeed): loaded into AdamW once built
        self.offload_optimizer = offload_optimizer
        self.autocast_bf16 = autocast_bf16
        self.last_loss: Tensor | float = float("nan")  # detached, on the device (read at step end)
        # This optimizer step's micro-batch losses, checked for finiteness once, before the step.
        self.step_losses: list[Tensor] = []
        self.sampler = None  # g -> sample (rwkv_bone.train.data); set before fit
        self.lr_scales: list[float] = []  # per optimizer group: lr = lr_at(step) * scale
        # Real (non-padding) positions trained since the last take_real_tokens(), summed on the
        # batch's device (read once per optimizer step, so no host sync per micro-batch).
        self.real_tokens: Tensor | int = 0
        # dpo / grpo (rwkv_bone.train.objectives.build); None = next-token loss. Their per-step
        # metrics are averaged over the step's micro-batches and read by the recorder.
        self.objective = None
        self.objective_sums: dict[str, Tensor] = {}
        self.objective_count = 0

    def train_dataloader(self) -> DataLoader:
        a = self.data
        ds = StepSamples(self.sampler, start_step=self.start_step, total_steps=self.total_steps,
                         rank=self.global_rank, world_size=self.trainer.world_size,
                         accumulate=a.accumulate_grad_batches, micro_bsz=a.micro_bsz)
        return DataLoader(ds, batch_size=a.micro_bsz, shuffle=False, num_workers=0, drop_last=False)

    @property
    def step(self) -> int:
        """Optimizer steps done so far in the whole run (0-based index of the step in progress)."""
        return self.start_step + self.trainer.global_step

    def current_lr(self) -> float:
        a = self.optim
        return lr_at(self.step, self.total_steps, a.lr_init, a.lr_final, a.lr_schedule, a.warmup_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = self.current_lr()
        for opt in self.trainer.optimizers:  # under DeepSpeed: its wrapper, same groups in order
            # The multipliers live here, not only in the groups: loading an optimizer state
            # replaces the group dicts with the saved ones.
            if len(opt.param_groups) != len(self.lr_scales):
                raise RuntimeError(f"{len(opt.param_groups)} optimizer groups, {len(self.lr_scales)} lr scales")
            for group, scale in zip(opt.param_groups, self.lr_scales):
                group["lr"] = lr * scale

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        micro = batch_idx % self.data.accumulate_grad_batches
        # Dropout (LoRA) randomness as a pure function of the position in the run.
        torch.manual_seed(hash((self.seed, self.step, self.global_rank, micro)) % (2**63))
        if self.objective is not None:
            return self.objective_step(batch, micro)
        x, y = batch[0], batch[1]  # (B, T) int64 each
        mask = batch[2] if len(batch) > 2 else None  # (B, T) float32, sft only
        # sft: (B,) int64 real positions per row; packed sft: (B, T) bool document starts.
        self.real_tokens = self.real_tokens + (batch[3].sum() if len(batch) > 3 else x.numel())
        doc_start = batch[4] if len(batch) > 4 else None
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.batch_loss(x, y, mask, doc_start)
        # No host sync per micro-batch: the loss stays on the device until the optimizer step.
        self.last_loss = loss.detach()
        self.step_losses.append(self.last_loss)
        self.log("loss", self.last_loss, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        return loss

    def objective_step(self, batch: tuple[Tensor, ...], micro: int) -> Tensor:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss, metrics, real = self.objective(self, batch, micro)
        self.real_tokens = self.real_tokens + real
        for k, v in metrics.items():
            self.objective_sums[k] = self.objective_sums.get(k, 0) + v.detach().float().to(self.device)
        self.objective_count += 1
        self.last_loss = loss.detach()
        self.step_losses.append(self.last_loss)
        self.log("loss", self.last_loss, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        return loss

    def take_objective_metrics(self) -> dict[str, Tensor]:
        """This step's objective metrics (means over its micro-batches), on the device."""
        out = {k: v / max(1, self.objective_count) for k, v in self.objective_sums.items()}
        self.objective_sums, self.objective_count = {}, 0
        return out

    def on_before_optimizer_step(self, optimizer) -> None:
        """One check (one host sync) per optimizer step, before the update: a NaN/inf loss in any
        of its micro-batches, on any rank, stops the run with the weights of the last step."""
        losses, self.step_losses = self.step_losses, []
        if not losses:
            return
        values = torch.stack([v.float() for v in losses])  # (micro-batches,)
        bad = (~torch.isfinite(values)).any().float()
        if self.trainer.world_size > 1:  # every rank stops together
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            own = [v for v in values.tolist() if not math.isfinite(v)]
            shown = own[0] if own else "non-finite on another rank"
            raise NonFiniteLoss(
                f"the loss became {shown} at step {self.step + 1}, so training stopped; the checkpoints "
                "already written are kept and the saved training state is one whose loss was finite - "
                "lower --lr_init (and keep --grad_clip on) and rerun with --resume, or restart"
            )

    def batch_loss(self, x: Tensor, y: Tensor, mask: Tensor | None, doc_start: Tensor | None = None) -> Tensor:
        """Scalar fp32 loss of one micro-batch (--chunked_ce: never the whole (B, T, V) logits);
        doc_start (B, T) bool for packed rows (each document runs from a clean state)."""
        a = self.optim
        l2wrap = a.l2wrap
        if a.train_type == "infctx":
            return infctx_loss(self.model, x, y, mask, a.chunk_ctx, l2wrap=l2wrap)
        if a.chunked_ce:
            h, _ = self.model.forward_features(x, None, doc_start)  # (B, T, C)
            if uses_fused_loss(self.model.head):  # head applied once per token, frozen or trained
                return fused_token_loss(self.model.head.weight, h, y, mask, l2wrap=l2wrap)
            return chunked_token_loss(self.model.head, h, y, mask, l2wrap=l2wrap)  # ZeRO-3 head
        logits = self.model(x) if doc_start is None else self.model(x, doc_start=doc_start)
        return token_loss(logits, y, mask, l2wrap=l2wrap)

    def take_real_tokens(self) -> int:
        """Real positions trained on this rank since the last call (one host sync)."""
        n, self.real_tokens = self.real_tokens, 0
        return int(n)

    def configure_optimizers(self):
        a = self.optim
        groups = optimizer_groups(self.model, a.weight_decay, a.layerwise_lr)
        if not groups:
            raise RuntimeError("no trainable parameters")
        self.lr_scales = [g["lr_scale"] for g in groups]
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

"""Per-step bookkeeping of a run: logs (train_log.txt, metrics.csv, W&B), epoch checkpoints,
resumable training state, and the loss-curve PNG at the end.

Files (rank 0 writes them; collective parts - loss averaging, gathering ZeRO tensors, DeepSpeed
state - run on every rank):
- PROJ_DIR/train_log.txt: "NEW RUN <timestamp>", the arguments, then per epoch the RWKV line
  `{epoch} {loss:.6f} {exp(loss):.4f} {lr:.8f} {datetime} {epoch}` (loss = mean over the epoch).
- PROJ_DIR/metrics.csv: step,loss,lr,tokens,kt/s,peak_mem_mb,valid_loss,valid_ppl,valid_acc (one row
  per optimizer step; the loss is averaged over micro-batches and ranks; kt/s counts real positions,
  sft padding excluded; the valid_* columns are filled on --valid_data steps). A resumed run drops
  rows after its state's step.
- W&B (--wandb PROJECT): loss, lr, Gtokens, kt/s per step. Without WANDB_MODE set and without a
  W&B login (WANDB_API_KEY or ~/.netrc), the run is recorded offline (`wandb sync` uploads it later).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import resource
import time

import pytorch_lightning as pl
import torch

from ..errors import UserError
from . import checkpoints as ck

METRICS_FILE = "metrics.csv"
METRICS_HEADER = ["step", "loss", "lr", "tokens", "kt/s", "peak_mem_mb", "valid_loss", "valid_ppl", "valid_acc"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def trim_metrics(path: str, last_step: int) -> None:
    """Keep the rows of steps <= last_step (a resumed run repeats the later ones)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(METRICS_HEADER)
    for row in rows[1:]:
        if row and row[0].isdigit() and int(row[0]) <= last_step:
            w.writerow(row)
    ck.text_atomic(out.getvalue(), path)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def start_wandb(project: str, name: str, config: dict, proj_dir: str):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        print("W&B: no login found, recording offline (upload later with `wandb sync`)")
    return wandb.init(project=project, name=name, config=config, mode=mode,
                      dir=os.environ.get("WANDB_DIR") or proj_dir)


def epoch_file(epoch: int, adapter_format: str = "ours") -> str:
    """rwkv-{epoch}.pth, or the HF PEFT folder rwkv-{epoch} with --adapter_format peft."""
    return f"rwkv-{epoch}" if adapter_format == "peft" else f"rwkv-{epoch}.pth"


class RunRecorder(pl.Callback):
    def __init__(self, args, *, start_step: int, total_steps: int, tokens_per_step: int, deepspeed_on: bool,
                 full_model: bool, run_name: str, resume_info: dict | None, full_dtype: torch.dtype) -> None:
        self.args = args
        self.start_step, self.total_steps = start_step, total_steps
        self.tokens_per_step = tokens_per_step
        self.deepspeed_on, self.full_model = deepspeed_on, full_model  # full_model: --peft none
        self.run_name = run_name
        self.resume_info = resume_info
        self.full_dtype = full_dtype
        self.init_factors: dict[str, torch.Tensor] = {}  # fp32 PiSSA/OLoRA A0, B0 (see checkpoints)
        el = resume_info.get("epoch_loss", [0.0, 0]) if resume_info else [0.0, 0]
        self.epoch_loss_sum, self.epoch_loss_count = float(el[0]), int(el[1])
        self.micro_losses: list[float] = []
        self.wandb_run = None
        self.saved_epochs: set[int] = set()
        self.t_last = time.time()
        # The state of step k is written once step k+1's loss is known to be finite (see save_state).
        self.pending_state: tuple[int, tuple[float, int]] | None = None
        self.saved_state_step: int | None = int(resume_info["step"]) if resume_info else None
        self.interrupted = False  # Ctrl-C (KeyboardInterrupt) seen by on_exception
        self.last_step = start_step

    # ---- helpers --------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.args.proj_dir, name)

    def epoch_of(self, step: int) -> int:
        """Epoch number (as named in files) containing optimizer step `step` (1-based)."""
        return self.args.epoch_begin + (step - 1) // self.args.epoch_steps

    # ---- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.resume_info and self.resume_info["kind"] == "deepspeed":
            ck.load_deepspeed_state(self.args.proj_dir, trainer.strategy.deepspeed_engine, self.resume_info)
        if trainer.is_global_zero:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
            with open(self.path("train_log.txt"), "a") as f:
                f.write(f"NEW RUN {stamp}\n{vars(self.args)}\n")
                if self.start_step:
                    f.write(f"resumed at step {self.start_step}\n")
            metrics = self.path(METRICS_FILE)
            if self.start_step:
                trim_metrics(metrics, self.start_step)
            if not self.start_step or not os.path.isfile(metrics):
                ck.text_atomic(",".join(self.metrics_header(pl_module)) + "\n", metrics)
            if self.args.wandb:
                self.wandb_run = start_wandb(self.args.wandb, self.run_name, vars(self.args), self.args.proj_dir)
        self.t_last = time.time()

    @staticmethod
    def metrics_header(pl_module) -> list[str]:
        """metrics.csv's columns: the common ones, then the objective's (dpo / grpo) if any."""
        objective = getattr(pl_module, "objective", None)
        return METRICS_HEADER + list(getattr(objective, "metric_names", ()))

    def objective_metrics(self, trainer: pl.Trainer, pl_module) -> dict[str, float]:
        if getattr(pl_module, "objective", None) is None:
            return {}
        out = {}
        for k, v in pl_module.take_objective_metrics().items():
            v = v.to(pl_module.device)
            out[k] = float(trainer.strategy.reduce(v, reduce_op="mean")) if trainer.world_size > 1 else float(v)
        return out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.micro_losses.append(pl_module.last_loss)
        if (batch_idx + 1) % self.args.accumulate_grad_batches:
            return
        step = pl_module.start_step + trainer.global_step  # optimizer steps done, 1-based index of this one
        self.last_step = step
        # The micro-batch losses are device tensors (no sync per micro-batch); one read per step.
        local = torch.stack([torch.as_tensor(v).to(torch.float64) for v in self.micro_losses]).mean()
        self.micro_losses.clear()
        loss = float(trainer.strategy.reduce(local.to(pl_module.device), reduce_op="mean")) \
            if trainer.world_size > 1 else float(local)
        now = time.time()
        # kt/s counts real positions (sft padding excluded), summed over ranks.
        real = pl_module.take_real_tokens() if hasattr(pl_module, "take_real_tokens") else self.tokens_per_step
        if trainer.world_size > 1:
            real = int(trainer.strategy.reduce(torch.tensor(float(real), device=pl_module.device), reduce_op="sum"))
        kts = real / max(now - self.t_last, 1e-9) / 1000
        lr = pl_module.args.lr_init if not trainer.optimizers else trainer.optimizers[0].param_groups[0]["lr"]
        pl_module.log("kt/s", kts, prog_bar=True, logger=False, on_step=True, on_epoch=False, rank_zero_only=True)
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1
        objective = self.objective_metrics(trainer, pl_module)  # every rank: the reduce is collective
        if objective:
            for k in ("reward_mean", "rewards_accuracy"):
                if k in objective:
                    pl_module.log(k, objective[k], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                                  rank_zero_only=True)
        if trainer.is_global_zero:
            tokens = step * self.tokens_per_step
            valid = getattr(pl_module, "valid_metrics", None) or {}  # set by train/validate.py's Validator
            vcols = ",".join(f"{valid[k]:.6f}" if k in valid else "" for k in ("valid_loss", "valid_ppl", "valid_acc"))
            with open(self.path(METRICS_FILE), "a") as f:
                ocols = "".join(f",{objective[k]:.6f}" for k in self.metrics_header(pl_module)[len(METRICS_HEADER):])
                f.write(f"{step},{loss:.6f},{lr:.8g},{tokens},{kts:.3f},{peak_memory_mb(pl_module.device):.1f},{vcols}"
                        f"{ocols}\n")
            if self.wandb_run is not None:
                self.wandb_run.log({"loss": loss, "lr": lr, "Gtokens": tokens / 1e9, "kt/s": kts, **valid, **objective},
                                   step=step)

        epoch_end = step % self.args.epoch_steps == 0 or step == self.total_steps
        if epoch_end:
            epoch = self.epoch_of(step)
            mean = self.epoch_loss_sum / max(1, self.epoch_loss_count)
            if trainer.is_global_zero:
                with open(self.path("train_log.txt"), "a") as f:
                    f.write(f"{epoch} {mean:.6f} {math.exp(min(mean, 700)):.4f} {lr:.8f} "
                            f"{datetime.datetime.now()} {epoch}\n")
            index = epoch - self.args.epoch_begin  # 0-based epoch of this run
            if (index + 1) % self.args.epoch_save == 0 or step == self.total_steps:
                self.save_epoch(trainer, pl_module, epoch, step, mean)
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        every = self.args.save_every_steps
        if epoch_end or (every and step % every == 0):
            self.save_state(trainer, pl_module, step)
        self.t_last = time.time()  # checkpoint time does not count against kt/s

    def save_epoch(self, trainer, pl_module, epoch: int, step: int, loss: float) -> None:
        meta = {"epoch": epoch, "step": step, "loss": loss, "tokens": step * self.tokens_per_step,
                "ctx_len": self.args.ctx_len, "load_model": self.args.load_model}
        fmt = getattr(self.args, "adapter_format", "ours")
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
        epoch_loss = (self.epoch_loss_sum, self.epoch_loss_count)
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
            ck.save_deepspeed_state(self.args.proj_dir, trainer.strategy.deepspeed_engine, step=step,
                                    epoch_loss=epoch_loss, args=self.args, is_rank0=trainer.is_global_zero,
                                    barrier=trainer.strategy.barrier)
        elif trainer.is_global_zero:
            ck.save_plain_state(self.args.proj_dir, step=step, model=pl_module.model,
                                optimizer=trainer.optimizers[0], epoch_loss=epoch_loss, args=self.args)
        self.saved_state_step = step

    def interrupted_message(self) -> str:
        """One line for Ctrl-C: where the state to --resume from is, or that there is none yet."""
        where = os.path.join(self.args.proj_dir, ck.STATE_POINTER if self.deepspeed_on else ck.STATE_FILE)
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
        if not trainer.is_global_zero:
            return
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        from ..plot import plot_runs

        plot_runs([self.args.proj_dir], self.path("loss.png"))

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def write_run_settings(args, path: str, extra: dict) -> None:
    """PROJ_DIR/run.json: the flags and model facts the plot labels and a later reader need."""
    ck.text_atomic(json.dumps({**vars(args), **extra}, indent=1, default=str), path)

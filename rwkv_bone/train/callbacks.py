"""Per-step logs of a run (train_log.txt, metrics.csv, W&B, progress bar) and the loss-curve PNG at
the end; epoch checkpoints and the resumable training state are train/saver.py's.

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
from .config import DataConfig, RunConfig

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
    w.writerow(rows[0] if rows else METRICS_HEADER)  # the run's own columns (objective metrics too)
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


def epoch_end(step: int, epoch_steps: int, total_steps: int) -> bool:
    """Whether optimizer step `step` (1-based) closes an epoch (the last step always does)."""
    return step % epoch_steps == 0 or step == total_steps


class MetricsLogger(pl.Callback):
    """The per-step loss (averaged over micro-batches and ranks) and the epoch's mean loss, written
    to metrics.csv, train_log.txt, W&B and the progress bar; the loss-curve PNG at the end.
    The Saver (listed after it) reads `epoch_mean` and `epoch_loss` for the files it writes."""

    def __init__(self, run: RunConfig, data: DataConfig, *, flags: dict, start_step: int, total_steps: int,
                 tokens_per_step: int, run_name: str, resume_info: dict | None) -> None:
        self.run, self.data = run, data
        self.flags = flags  # every flag and its value, as recorded in train_log.txt and W&B
        self.start_step, self.total_steps = start_step, total_steps
        self.tokens_per_step = tokens_per_step
        self.run_name = run_name
        el = resume_info.get("epoch_loss", [0.0, 0]) if resume_info else [0.0, 0]
        self.epoch_loss_sum, self.epoch_loss_count = float(el[0]), int(el[1])
        self.epoch_mean = float("nan")  # mean loss of the last epoch that ended
        self.micro_losses: list = []
        self.wandb_run = None
        self.t_last = time.time()

    def path(self, name: str) -> str:
        return os.path.join(self.run.proj_dir, name)

    @property
    def epoch_loss(self) -> tuple[float, int]:
        """(sum, count) of the step losses of the epoch in progress (kept in the training state)."""
        return self.epoch_loss_sum, self.epoch_loss_count

    def restart_clock(self) -> None:
        """Called after checkpoints are written: their time does not count against kt/s."""
        self.t_last = time.time()

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
            with open(self.path("train_log.txt"), "a") as f:
                f.write(f"NEW RUN {stamp}\n{self.flags}\n")
                if self.start_step:
                    f.write(f"resumed at step {self.start_step}\n")
            metrics = self.path(METRICS_FILE)
            if self.start_step:
                trim_metrics(metrics, self.start_step)
            if not self.start_step or not os.path.isfile(metrics):
                ck.text_atomic(",".join(self.metrics_header(pl_module)) + "\n", metrics)
            if self.run.wandb:
                self.wandb_run = start_wandb(self.run.wandb, self.run_name, self.flags, self.run.proj_dir)
        self.t_last = time.time()

    @staticmethod
    def metrics_header(pl_module) -> list[str]:
        """metrics.csv's columns: the common ones, then the objective's (dpo / grpo) if any."""
        objective = getattr(pl_module, "objective", None)
        return METRICS_HEADER + list(getattr(objective, "metric_names", ()))

    @staticmethod
    def objective_metrics(trainer: pl.Trainer, pl_module) -> dict[str, float]:
        """This step's dpo / grpo metrics, averaged over micro-batches and ranks."""
        if getattr(pl_module, "objective", None) is None:
            return {}
        out = {}
        for k, v in pl_module.take_objective_metrics().items():
            v = v.to(pl_module.device)
            out[k] = float(trainer.strategy.reduce(v, reduce_op="mean")) if trainer.world_size > 1 else float(v)
        return out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.micro_losses.append(pl_module.last_loss)
        if (batch_idx + 1) % self.data.accumulate_grad_batches:
            return
        step = pl_module.start_step + trainer.global_step  # optimizer steps done, 1-based index of this one
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
        lr = pl_module.optim.lr_init if not trainer.optimizers else trainer.optimizers[0].param_groups[0]["lr"]
        pl_module.log("kt/s", kts, prog_bar=True, logger=False, on_step=True, on_epoch=False, rank_zero_only=True)
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1
        objective = self.objective_metrics(trainer, pl_module)  # on every rank: the reduce is collective
        for k in ("reward_mean", "rewards_accuracy"):
            if k in objective:
                pl_module.log(k, objective[k], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                              rank_zero_only=True)
        if trainer.is_global_zero:
            tokens = step * self.tokens_per_step
            valid = getattr(pl_module, "valid_metrics", None) or {}  # set by train/validate.py's Validator
            vcols = ",".join(f"{valid[k]:.6f}" if k in valid else "" for k in ("valid_loss", "valid_ppl", "valid_acc"))
            ocols = "".join(f",{objective[k]:.6f}" for k in self.metrics_header(pl_module)[len(METRICS_HEADER):])
            with open(self.path(METRICS_FILE), "a") as f:
                f.write(f"{step},{loss:.6f},{lr:.8g},{tokens},{kts:.3f},{peak_memory_mb(pl_module.device):.1f},{vcols}"
                        f"{ocols}\n")
            if self.wandb_run is not None:
                self.wandb_run.log({"loss": loss, "lr": lr, "Gtokens": tokens / 1e9, "kt/s": kts, **valid,
                                    **objective}, step=step)
        if epoch_end(step, self.run.epoch_steps, self.total_steps):
            epoch = self.run.epoch_of(step)
            self.epoch_mean = self.epoch_loss_sum / max(1, self.epoch_loss_count)
            if trainer.is_global_zero:
                with open(self.path("train_log.txt"), "a") as f:
                    f.write(f"{epoch} {self.epoch_mean:.6f} {math.exp(min(self.epoch_mean, 700)):.4f} {lr:.8f} "
                            f"{datetime.datetime.now()} {epoch}\n")
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        self.t_last = time.time()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        from ..plot import plot_runs

        plot_runs([self.run.proj_dir], self.path("loss.png"))

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def write_run_settings(args, path: str, extra: dict) -> None:
    """PROJ_DIR/run.json: the flags and model facts the plot labels and a later reader need."""
    ck.text_atomic(json.dumps({**vars(args), **extra}, indent=1, default=str), path)

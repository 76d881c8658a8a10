"""Held-out evaluation during training (--valid_data / --valid_every / --valid_task / --valid_limit).

Every --valid_every optimizer steps (and after the last one) the model, adapters attached, is put
in eval mode and scored with rwkv_bone.eval: the masked response-token loss over all of
--valid_data (valid_loss, and valid_ppl = exp(valid_loss)) and, with --valid_task, the greedy
accuracy on the first --valid_limit records (valid_acc). The numbers go to the progress bar, to
metrics.csv (columns valid_loss, valid_ppl, valid_acc, empty on other steps) and to W&B, so a
run can be watched for overfitting. --valid_data is a .jsonl (tokenised here, exactly as make_data
does, with --valid_tokenizer) or a make_data binidx prefix with its mask.
"""
from __future__ import annotations

import contextlib
import math

import pytorch_lightning as pl
import torch

from .config import DataConfig, RunConfig, ValidConfig

VALID_COLUMNS = ("valid_loss", "valid_ppl", "valid_acc")


class Validator(pl.Callback):
    """Computes the validation numbers on the steps it is due and leaves them in
    `pl_module.valid_metrics` for the MetricsLogger (listed after it) to write."""

    def __init__(self, valid: ValidConfig, data: DataConfig, run: RunConfig, total_steps: int) -> None:
        from ..data.tokenizer import load_tokenizer
        from ..eval.loss import docs_from_binidx, docs_from_jsonl
        from ..eval.records import load_records

        self.valid, self.data, self.run, self.total_steps = valid, data, run, total_steps
        self.tokenizer = load_tokenizer(valid.valid_tokenizer or None)
        if valid.valid_data.endswith(".jsonl"):
            self.docs = docs_from_jsonl(valid.valid_data, self.tokenizer)
        else:
            self.docs = docs_from_binidx(valid.valid_data)
        self.records = (load_records(valid.valid_data, limit=valid.valid_limit)
                        if valid.valid_task != "none" else None)

    def due(self, step: int) -> bool:
        every = self.valid.valid_every or self.run.epoch_steps
        return step % every == 0 or step == self.total_steps

    @torch.no_grad()
    def evaluate(self, pl_module) -> dict[str, float]:
        from ..eval.evaluate import EvalOptions, generate_answers
        from ..eval.loss import doc_losses, summarize_losses

        model = pl_module.model
        was_training = model.training
        model.eval()
        amp = torch.autocast(device_type=pl_module.device.type, dtype=torch.bfloat16) \
            if pl_module.autocast_bf16 else contextlib.nullcontext()
        try:
            with amp:
                s = summarize_losses(doc_losses(model, self.docs, batch_size=self.data.micro_bsz))
                out = {"valid_loss": s["loss"], "valid_ppl": s["perplexity"]}
                if self.records is not None:
                    o = EvalOptions(model="", data=self.valid.valid_data, task=self.valid.valid_task,
                                    max_tokens=self.valid.valid_max_tokens, progress=False)
                    rows, _, _ = generate_answers(model, self.tokenizer, self.records, o)
                    out["valid_acc"] = sum(r["correct"] for r in rows) / len(rows)
        finally:
            model.train(was_training)
        return out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.valid_metrics = {}
        if (batch_idx + 1) % self.data.accumulate_grad_batches:
            return
        step = pl_module.start_step + trainer.global_step
        if not self.due(step):
            return
        metrics = self.evaluate(pl_module)
        pl_module.valid_metrics = metrics
        for k, v in metrics.items():
            if math.isfinite(v):
                pl_module.log(k, v, prog_bar=True, logger=False, on_step=True, on_epoch=False, rank_zero_only=True)

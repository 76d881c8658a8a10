"""train.py's settings as frozen, typed sections, built once from the validated flags.

`TrainConfig.from_args(args)` takes the Namespace that `args.parse_args` returned (after
`args.validate` filled the defaults that depend on other flags: lr_init, lr_final, l2wrap, strategy)
and splits it into one section per component, so each part of the trainer gets only what it reads
and no part repeats a parser default:

- model: where the base comes from (--load_model, or dims for training from scratch)
- data: the sampler and the batch shape (micro-batch, gradient accumulation)
- optim: lr schedule, AdamW, gradient clipping, layerwise lr and how the loss is computed
  (L2Wrap, chunked cross-entropy, activation checkpointing, infctx chunks)
- hardware: precision, accelerator, processes, strategy
- run: output folder, seed, length of the run, save cadence, W&B, progress bar, resume
- valid: held-out evaluation during training
- method: the adapter flags (a read-only mapping; the method registry owns their meaning)

Every parser flag lands in exactly one section (tests/test_train_config.py checks it).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Mapping

from .args import precision_mode


@dataclass(frozen=True)
class ModelConfig:
    load_model: str | None
    model_preset: str
    n_layer: int
    n_embd: int
    vocab_size: int


@dataclass(frozen=True)
class DataConfig:
    data_file: str
    data_type: str
    ctx_len: int
    sft_pack: bool
    magic_prime: int
    micro_bsz: int
    accumulate_grad_batches: int


@dataclass(frozen=True)
class OptimConfig:
    lr_init: float
    lr_final: float
    lr_schedule: str
    warmup_steps: int
    beta1: float
    beta2: float
    adam_eps: float
    weight_decay: float
    grad_clip: float
    layerwise_lr: bool
    l2wrap: bool
    chunked_ce: bool
    grad_cp: bool
    train_type: str
    chunk_ctx: int


@dataclass(frozen=True)
class HardwareConfig:
    precision: str
    accelerator: str
    devices: int
    num_nodes: int
    strategy: str
    wkv_backend: str

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def bf16(self) -> bool:
        return precision_mode(self) == "bf16"


@dataclass(frozen=True)
class RunConfig:
    proj_dir: str
    random_seed: int
    epoch_steps: int
    epoch_count: int
    epoch_begin: int
    epoch_save: int
    save_every_steps: int
    my_exit_tokens: int
    wandb: str
    progress: bool
    resume: bool
    dry_run: bool

    def epoch_of(self, step: int) -> int:
        """Epoch number (as named in files) containing optimizer step `step` (1-based)."""
        return self.epoch_begin + (step - 1) // self.epoch_steps


@dataclass(frozen=True)
class ValidConfig:
    valid_data: str
    valid_every: int
    valid_task: str
    valid_limit: int
    valid_max_tokens: int
    valid_tokenizer: str


@dataclass(frozen=True)
class ObjectiveConfig:
    """--objective and its settings (rwkv_bone/train/objectives/options.py)."""
    objective: str
    dpo_beta: float
    dpo_loss: str
    reward: str
    tokenizer: str
    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    grpo_beta: float
    grpo_epsilon: float
    grpo_iterations: int
    grpo_loss: str


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                             "hardware": HardwareConfig, "run": RunConfig, "valid": ValidConfig,
                             "objective": ObjectiveConfig}


def section_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _build(cls: type, values: Mapping[str, Any]):
    return cls(**{name: values[name] for name in section_fields(cls)})


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    hardware: HardwareConfig
    run: RunConfig
    valid: ValidConfig
    objective: ObjectiveConfig
    method: Mapping[str, Any]  # adapter flags (--peft, --bone_b, ...), read-only
    order: tuple[str, ...] = ()  # the flags in parser order, for as_dict

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The sections of a validated Namespace (parse_args' result); every flag no typed section
        claims is an adapter flag and goes to `method`."""
        values = vars(args)
        typed = {name for c in SECTIONS.values() for name in section_fields(c)}
        sections = {key: _build(c, values) for key, c in SECTIONS.items()}
        method = types.MappingProxyType({k: v for k, v in values.items() if k not in typed})
        return cls(**sections, method=method, order=tuple(values))

    def as_dict(self) -> dict[str, Any]:
        """Every flag and its value, in the parser's order (what train_log.txt, run.json and W&B record)."""
        flat: dict[str, Any] = dict(self.method)
        for key in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, key)))
        return {k: flat[k] for k in self.order if k in flat} | {k: v for k, v in flat.items() if k not in self.order}

    def as_namespace(self) -> argparse.Namespace:
        """The flags as a Namespace, for the helpers that read flags by name (resume settings)."""
        return argparse.Namespace(**self.as_dict())

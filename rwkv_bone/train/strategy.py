"""Distribution strategies: Lightning's DDP / DeepSpeed ZeRO on GPUs, and the same ZeRO path on CPUs.

Lightning's stock DeepSpeedStrategy refuses any accelerator but CUDA and insists that device
indices equal local ranks (CPU devices have no index). `CPUDeepSpeedStrategy` skips exactly those
two checks; DeepSpeed itself runs on CPU with its CPU accelerator (DS_ACCELERATOR=cpu, which must
be set before deepspeed is first imported) and the gloo process-group backend (never oneCCL).
Everything else - ZeRO partitioning, gradient clipping, checkpoint files - is DeepSpeed's own code.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any

import torch

from ..errors import UserError

DEEPSPEED_STAGES = {
    "deepspeed_stage_1": (1, False),
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_2_offload": (2, True),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_3_offload": (3, True),
}


def is_deepspeed(strategy: str) -> bool:
    return strategy in DEEPSPEED_STAGES


def resolve_accelerator(name: str) -> str:
    """'cpu' or 'gpu' ('auto' picks a GPU when CUDA is available)."""
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if name in ("gpu", "cuda") else "cpu"


def prepare_deepspeed_environment(accelerator: str) -> None:
    """Pick DeepSpeed's accelerator before deepspeed is imported (child ranks inherit the env)."""
    if accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        # Single-node gloo rendezvous on the loopback interface; keeps gloo off unreachable NICs.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls collectives torch now marks deprecated; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")


def _cpu_deepspeed_class():
    from lightning_fabric.utilities.seed import reset_seed
    from pytorch_lightning.strategies import DeepSpeedStrategy
    from pytorch_lightning.strategies.ddp import DDPStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeedStrategy that runs ZeRO on CPU processes (gloo)."""

        strategy_name = "deepspeed_cpu"

        def setup_environment(self) -> None:
            # Skip DeepSpeedStrategy's "CUDA only" check; DDPStrategy's set-up is what it would run next.
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            # Same as DeepSpeedStrategy.setup_distributed minus the GPU index check.
            reset_seed()
            self.set_world_ranks()
            # DeepSpeed's CPU backend JIT-builds its shared-memory op here, which only its
            # inference_all_reduce uses (training's collectives are gloo's): skip the build, a
            # minute of compiling on a fresh machine, whose lock file, left by a run killed
            # mid-build, makes every later run wait forever.
            ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` names torch
            build, ds_torch.build_shm_op = ds_torch.build_shm_op, lambda: None
            try:
                self._init_deepspeed_distributed()
            finally:
                ds_torch.build_shm_op = build

        def _get_process_group_backend(self) -> str:
            return "gloo"

        @property
        def root_device(self) -> torch.device:
            # deepspeed.initialize reads the rank's device index; CPU tensors ignore it.
            return torch.device("cpu", self.local_rank)

    return CPUDeepSpeedStrategy


def build_strategy(strategy: str, accelerator: str) -> Any:
    """The `strategy` argument for pl.Trainer."""
    if not is_deepspeed(strategy):
        if strategy == "ddp" and accelerator == "cpu":
            from pytorch_lightning.strategies import DDPStrategy

            return DDPStrategy(process_group_backend="gloo")
        return strategy
    prepare_deepspeed_environment(accelerator)
    try:
        import deepspeed  # noqa: F401  (after DS_ACCELERATOR is set)
    except ImportError:
        raise UserError(f"--strategy {strategy} needs DeepSpeed: pip install deepspeed "
                        "(or use --strategy auto / ddp)") from None
    stage, offload = DEEPSPEED_STAGES[strategy]
    options: dict[str, Any] = dict(
        stage=stage,
        offload_optimizer=offload,
        offload_parameters=offload and stage == 3,
        exclude_frozen_parameters=True,  # training-state files hold only what trains
        logging_level=logging.WARNING,
        allgather_bucket_size=200_000_000,
        reduce_bucket_size=200_000_000,
    )
    if accelerator == "cpu":
        return _cpu_deepspeed_class()(process_group_backend="gloo", **options)
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**options)


def full_fp32_param(param: torch.nn.Parameter, deepspeed_on: bool) -> torch.Tensor:
    """The complete fp32 value of a trained parameter: DeepSpeed's (possibly partitioned) master copy
    under ZeRO, the parameter itself otherwise. Collective under DeepSpeed: every rank must call it."""
    if deepspeed_on:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full.detach().float().cpu().clone()
    return param.detach().float().cpu().clone()

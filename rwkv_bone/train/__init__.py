"""The trainer behind train.py: flags (args), samplers (data), schedule, LightningModule (module),
strategies incl. DeepSpeed on CPU (strategy), logs/checkpoints (callbacks, checkpoints), run."""
from .args import build_parser, parse_args
from .run import run
from .schedule import lr_at

__all__ = ["build_parser", "parse_args", "run", "lr_at"]

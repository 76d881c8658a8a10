"""The trainer behind train.py: flags (args), samplers (data), schedule, LightningModule (module),
strategies incl. DeepSpeed on CPU (strategy), typed sections of the flags (config), logs (callbacks),
checkpoints (saver, checkpoints), run."""
from ..lazy import lazy_package
from .args import build_parser, parse_args
from .schedule import lr_at

# run imports torch and Lightning; loaded on first use so train.py --help answers at once.
lazy_package(__name__, {"run": "run"})

__all__ = ["build_parser", "parse_args", "run", "lr_at"]

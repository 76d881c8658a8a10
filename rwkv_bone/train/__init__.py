"""The trainer behind train.py: flags (args), samplers (data), schedule, LightningModule (module),
strategies incl. DeepSpeed on CPU (strategy), typed sections of the flags (config), logs (callbacks),
checkpoints (saver, checkpoints), run."""
import sys
import types

from .args import build_parser, parse_args
from .schedule import lr_at


class _Package(types.ModuleType):
    """`run` is both a submodule and its function. Loading the submodule sets the package's `run` to
    the module; keep the function there instead, as the eager `from .run import run` used to."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "run" and isinstance(value, types.ModuleType):
            value = value.run
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    # run imports torch and Lightning; loaded on first use so train.py --help answers at once.
    if name == "run":
        from .run import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_parser", "parse_args", "run", "lr_at"]

"""Scoring fine-tuned models the way the paper does: GSM8K / MATH accuracy and held-out loss.

records  - .jsonl records, prompts rendered with make_data's template
answers  - answer extraction and comparison (gsm8k, math, exact)
score    - accuracy and its Wilson interval
loss     - masked response-token loss and perplexity
evaluate - one evaluation run (predictions.jsonl + summary.json); eval.py is its CLI
"""
import sys
import types

from .answers import ALL_TASKS, TASKS, extract, is_correct
from .score import wilson_interval


class _Package(types.ModuleType):
    """`evaluate` is both a submodule and its function. Loading the submodule sets the package's
    `evaluate` to the module; keep the function there, as the eager import used to."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            value = value.evaluate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    # evaluate imports torch; loaded on first use so eval.py --help (and the answer helpers) stay light.
    if name in ("EvalOptions", "evaluate"):
        from .evaluate import EvalOptions, evaluate  # loading it sets the package's `evaluate` (see _Package)

        return {"EvalOptions": EvalOptions, "evaluate": evaluate}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASKS", "ALL_TASKS", "EvalOptions", "evaluate", "extract", "is_correct", "wilson_interval"]

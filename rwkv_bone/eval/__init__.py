"""Scoring fine-tuned models the way the paper does: GSM8K / MATH accuracy and held-out loss.

records  - .jsonl records, prompts rendered with make_data's template
answers  - answer extraction and comparison (gsm8k, math, exact)
score    - accuracy and its Wilson interval
loss     - masked response-token loss and perplexity
evaluate - one evaluation run (predictions.jsonl + summary.json); eval.py is its CLI
"""
from ..lazy import lazy_package
from .answers import ALL_TASKS, TASKS, extract, is_correct
from .score import wilson_interval

# evaluate imports torch; loaded on first use so eval.py --help (and the answer helpers) stay light.
lazy_package(__name__, {"EvalOptions": "evaluate", "evaluate": "evaluate"})

__all__ = ["TASKS", "ALL_TASKS", "EvalOptions", "evaluate", "extract", "is_correct", "wilson_interval"]

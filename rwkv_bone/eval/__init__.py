"""Scoring fine-tuned models the way the paper does: GSM8K / MATH accuracy and held-out loss.

records  - .jsonl records, prompts rendered with make_data's template
answers  - answer extraction and comparison (gsm8k, math, exact)
score    - accuracy and its Wilson interval
loss     - masked response-token loss and perplexity
evaluate - one evaluation run (predictions.jsonl + summary.json); eval.py is its CLI
"""
from .answers import TASKS, extract, is_correct
from .evaluate import ALL_TASKS, EvalOptions, evaluate
from .score import wilson_interval

__all__ = ["TASKS", "ALL_TASKS", "EvalOptions", "evaluate", "extract", "is_correct", "wilson_interval"]

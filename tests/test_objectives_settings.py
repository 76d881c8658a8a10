"""DPO and GRPO with the settings an SFT run takes: quantised frozen weights (the --quant types
that run on CPU), bf16, gradient checkpointing and validation during training. Two steps each,
finite objective metrics."""
from __future__ import annotations

import math
import os

import pytest

from test_train_helpers import base_flags, train_cli
from test_train_objectives import files, grpo_flags, pairs, rows  # noqa: F401  (fixtures)

COLUMNS = {"dpo": ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin"),
           "grpo": ("reward_mean", "reward_std", "kl", "completion_tokens", "clip_fraction")}
SETTINGS = {
    "quant_nf4": dict(quant="nf4"),
    "quant_int8": dict(quant="int8"),
    "bf16": dict(precision="bf16"),
    "grad_cp": dict(grad_cp=1),
    "valid": dict(valid_task="gsm8k", valid_limit=2, valid_max_tokens=2),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_objective_runs_with_setting(files, pairs, tmp_path, objective, setting):  # noqa: F811
    proj = str(tmp_path / "run")
    over = dict(epoch_steps=2, epoch_count=1, **SETTINGS[setting])
    if setting == "valid":
        over.update(valid_data=files["prompts"], valid_tokenizer=files["vocab"])
    if objective == "dpo":
        flags = base_flags(files["digits"], pairs, proj, objective="dpo", data_type="pairs", ctx_len=48, **over)
    else:
        flags = grpo_flags(files, proj, **over)
    r = train_cli(flags)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = rows(proj)
    assert len(got) == 2
    for row in got:
        assert math.isfinite(float(row["loss"]))
        for k in COLUMNS[objective]:
            assert math.isfinite(float(row[k])), k
    if objective == "dpo":  # the reference is the policy at the start, whatever the precision
        assert abs(float(got[0]["loss"]) - math.log(2)) < 1e-6
    if setting == "valid":
        assert 0 <= float(got[-1]["valid_acc"]) <= 1 and math.isfinite(float(got[-1]["valid_loss"]))
    assert os.path.isfile(os.path.join(proj, "rwkv-0.pth"))

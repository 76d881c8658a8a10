"""DPO and GRPO under DeepSpeed ZeRO on two CPU processes (gloo), as test_train_deepspeed.py runs
SFT: they train, log their objective columns and save what merges. Two steps, tiny model."""
from __future__ import annotations

import math
import os

import pytest
import torch

from test_train_helpers import base_flags, train_cli
from test_train_objectives import files, grpo_flags, pairs, rows  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

DPO_COLUMNS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")
GRPO_COLUMNS = ("reward_mean", "reward_std", "kl", "completion_tokens", "clip_fraction")


def run_objective(files, pairs, proj, objective, strategy, peft):  # noqa: F811
    over = dict(strategy=strategy, devices=2, epoch_steps=2, epoch_count=1)
    if objective == "dpo":
        extra = dict(bone_b=16) if peft == "bone" else dict(bone_b=None, lr_init=1e-3 if peft == "none" else 1e-2)
        flags = base_flags(files["digits"], pairs, proj, objective="dpo", data_type="pairs", ctx_len=48, peft=peft,
                           **extra, **over)
    else:
        flags = grpo_flags(files, proj, **over)
    r = train_cli(flags)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return proj


@pytest.fixture(scope="module")
def dpo_zero2(files, pairs, tmp_path_factory):  # noqa: F811
    return run_objective(files, pairs, str(tmp_path_factory.mktemp("zero2") / "run"), "dpo", "deepspeed_stage_2", "bone")


@pytest.mark.parametrize("objective,strategy,peft", [
    ("dpo", "deepspeed_stage_2", "bone"),
    ("grpo", "deepspeed_stage_1", "lora"),
    ("dpo", "deepspeed_stage_3", "state"),  # the reference swap through GatheredParameters
    ("dpo", "deepspeed_stage_3", "none"),   # stored reference: nothing is swapped
])
def test_objective_under_zero_on_two_processes_saves_what_merges(files, pairs, dpo_zero2, tmp_path,  # noqa: F811
                                                                 objective, strategy, peft):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import load_adapter, merge_state_dict, read_adapter_file

    if (objective, strategy) == ("dpo", "deepspeed_stage_2"):
        proj = dpo_zero2
    else:
        proj = run_objective(files, pairs, str(tmp_path / "run"), objective, strategy, peft)
    got = rows(proj)
    assert len(got) == 2
    for row in got:
        for k in DPO_COLUMNS if objective == "dpo" else GRPO_COLUMNS:
            assert math.isfinite(float(row[k])), k
    if objective == "dpo":
        assert abs(float(got[0]["loss"]) - math.log(2)) < 1e-6
    path = os.path.join(proj, "rwkv-0.pth")
    base_sd = torch.load(files["digits"], weights_only=True)
    x = torch.randint(1, 300, (1, 12))
    base = RWKV6.from_state_dict(base_sd).eval()
    if peft == "none":
        trained = RWKV6.from_checkpoint(path).eval()
    else:
        trained = RWKV6.from_state_dict(base_sd).eval()
        load_adapter(trained, path)
        merged = RWKV6.from_state_dict(merge_state_dict(base_sd, read_adapter_file(path))).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(x), trained(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(trained(x), base(x))  # the run really trained


def test_dpo_with_an_adapter_under_zero3_equals_zero2(files, pairs, dpo_zero2, tmp_path):  # noqa: F811
    # ZeRO-3 slices every weight; the reference swap gathers, overwrites and re-slices the adapter
    # and puts it back bit for bit, so the run is ZeRO-2's to the last bit (CPU, fp32).
    proj = run_objective(files, pairs, str(tmp_path / "run"), "dpo", "deepspeed_stage_3", "bone")
    def logged(p):
        return [{k: v for k, v in r.items() if k not in ("kt/s", "peak_mem_mb")} for r in rows(p)]

    assert logged(proj) == logged(dpo_zero2)
    a = torch.load(os.path.join(dpo_zero2, "rwkv-0.pth"), weights_only=True)
    b = torch.load(os.path.join(proj, "rwkv-0.pth"), weights_only=True)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k

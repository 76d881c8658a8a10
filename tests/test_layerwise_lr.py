"""--layerwise_lr 1: the time_decay* tensors step at 2x the scheduled lr, everything else at 1x,
at every step of a decaying schedule, after --resume, and under DeepSpeed.

The update sizes are read off real training runs: with --beta1 0 --beta2 0 (and no clipping or
weight decay) one AdamW step moves every element by lr * g / (|g| + eps), i.e. by exactly the
group's lr wherever |g| >> eps, so max |delta| of a tensor over one step IS its group's lr.
--epoch_steps 1 writes the trained tensors after every step (rwkv-{k}.pth).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import random_model
from test_train_helpers import base_flags, pattern_data, train_cli
from rwkv_bone.errors import UserError
from rwkv_bone.peft import apply_peft, mark_trainable
from rwkv_bone.train.args import parse_args
from rwkv_bone.train.module import optimizer_groups
from rwkv_bone.train.schedule import lr_at

STEPS, LR, LR_FINAL, WARMUP = 4, 1e-2, 2e-3, 1


def _trained_model():
    model = random_model(0, n_layer=2, n_embd=64, vocab_size=64)
    apply_peft(model, "bone", bone_b=16)
    mark_trainable(model, "time,ln")
    return model


def test_groups_put_time_decay_tensors_at_twice_the_lr():
    model = _trained_model()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    by_param = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, 0.1, layerwise_lr=True)
    # time_decay is (1, 1, A): all three are 2+-dim, so one 2x group (with decay)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 2.0]  # 1x first: metrics log group 0
    fast = {by_param[id(p)] for g in groups if g["lr_scale"] == 2.0 for p in g["params"]}
    assert fast == {f"blocks.{i}.att.{t}" for i in range(2)
                    for t in ("time_decay", "time_decay_w1", "time_decay_w2")}
    assert {by_param[id(p)] for g in groups for p in g["params"]} == trained
    assert all(g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)
               for g in groups)  # the decay split is kept inside each lr group
    assert [g["lr_scale"] for g in optimizer_groups(model, 0.0)] == [1.0]


def test_layerwise_lr_needs_the_time_decay_tensors_to_train(tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"")
    base = ["--load_model", str(ckpt), "--data_file", "d", "--layerwise_lr", "1"]
    with pytest.raises(UserError, match="--layerwise_lr 1 doubles the lr of the time_decay tensors"):
        parse_args(base)
    assert parse_args(base + ["--train_parts", "time,ln"]).layerwise_lr


# ---- real runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layerwise")
    ckpt = str(d / "base.pth")
    random_model(0, n_layer=2, n_embd=64, vocab_size=64).save_checkpoint(ckpt)
    return {"ckpt": ckpt, "data": pattern_data(str(d / "pattern")), "dir": d}


def flags(files, proj: str, **over) -> list[str]:
    opts = dict(epoch_steps=1, epoch_count=STEPS, lr_init=LR, lr_final=LR_FINAL, lr_schedule="linear",
                warmup_steps=WARMUP, beta1=0.0, beta2=0.0, grad_clip=0.0, train_parts="time,ln",
                layerwise_lr=1)
    opts.update(over)
    return base_flags(files["ckpt"], files["data"], proj, **opts)


def train(argv: list[str]) -> None:
    r = train_cli(argv)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def step_sizes(files, proj: str) -> list[dict[str, float]]:
    """[{tensor name: max |delta| over optimizer step k}] for k = 0 .. STEPS-1."""
    base = torch.load(files["ckpt"], weights_only=True)
    prev = None
    out = []
    for k in range(STEPS):
        sd = {n: t for n, t in torch.load(os.path.join(proj, f"rwkv-{k}.pth"), weights_only=True).items()
              if isinstance(t, torch.Tensor)}
        if prev is None:  # before step 0: the checkpoint's values, zero Bone blocks
            prev = {n: base.get(n, torch.zeros_like(t)).float().reshape(t.shape) for n, t in sd.items()}
        out.append({n: (t.double() - prev[n].double()).abs().max().item() for n, t in sd.items()})
        prev = sd
    return out


def assert_group_lrs(sizes: list[dict[str, float]], fast_scale: float) -> None:
    names = sizes[0].keys()
    assert any(n.endswith(".bone") for n in names) and any(n.endswith("ln1.weight") for n in names)
    assert sum("time_decay" in n for n in names) == 6 and any("time_maa_w1" in n for n in names)
    for k, row in enumerate(sizes):
        lr = lr_at(k, STEPS, LR, LR_FINAL, "linear", WARMUP)
        for name, size in row.items():
            if name.endswith("time_decay_w2") and k == 0:
                continue  # zero-initialised time_decay_w1 -> no gradient for w2 at step 0
            want = lr * (fast_scale if "time_decay" in name else 1.0)
            assert size == pytest.approx(want, rel=2e-3), (k, name, size, want)


@pytest.fixture(scope="module")
def uninterrupted(files):
    proj = str(files["dir"] / "full")
    train(flags(files, proj))
    return proj


def test_update_sizes_follow_the_schedule_times_each_group_scale(files, uninterrupted):
    sizes = step_sizes(files, uninterrupted)
    assert_group_lrs(sizes, fast_scale=2.0)
    with open(os.path.join(uninterrupted, "metrics.csv")) as f:  # the logged lr is the base lr
        logged = [float(line.split(",")[2]) for line in f.read().splitlines()[1:]]
    assert logged == pytest.approx([lr_at(k, STEPS, LR, LR_FINAL, "linear", WARMUP) for k in range(STEPS)])


def test_without_layerwise_lr_every_tensor_steps_at_the_base_lr(files):
    proj = str(files["dir"] / "plain")
    train(flags(files, proj, layerwise_lr=0))
    assert_group_lrs(step_sizes(files, proj), fast_scale=1.0)


@pytest.mark.slow
def test_resume_keeps_the_group_multipliers(files, uninterrupted):
    proj = str(files["dir"] / "resumed")
    train(flags(files, proj, my_exit_tokens=2 * 2 * 16))  # stop after 2 of 4 steps
    assert not os.path.exists(os.path.join(proj, "rwkv-2.pth"))
    r = train_cli(flags(files, proj, resume=True, layerwise_lr=0))
    assert r.returncode != 0 and "--layerwise_lr" in r.stderr.strip().splitlines()[-1]
    train(flags(files, proj, resume=True))
    for k in (2, 3):
        a = torch.load(os.path.join(uninterrupted, f"rwkv-{k}.pth"), weights_only=True)
        b = torch.load(os.path.join(proj, f"rwkv-{k}.pth"), weights_only=True)
        assert all(torch.equal(b[n], t) for n, t in a.items() if isinstance(t, torch.Tensor)), k
    assert_group_lrs(step_sizes(files, proj), fast_scale=2.0)


@pytest.mark.slow
def test_deepspeed_zero2_applies_the_group_multipliers(files):
    proj = str(files["dir"] / "zero2")
    train(flags(files, proj, strategy="deepspeed_stage_2", devices=1))
    assert_group_lrs(step_sizes(files, proj), fast_scale=2.0)

"""Trainer pieces without a training run: lr schedule, samplers, loss, optimizer groups, flags."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.train import parse_args
from rwkv_bone.train.data import (MagicPrimeWindows, RandomWindows, SFTDocuments, StepSamples,
                                  global_sample_number, magic_prime_start)
from rwkv_bone.train.module import optimizer_groups, token_loss
from rwkv_bone.train.schedule import lr_at


# ---- learning-rate schedule -------------------------------------------------------------------
def test_constant_schedule_is_lr_init_everywhere():
    assert [lr_at(s, 10, 2e-5, 1e-6, "constant") for s in range(10)] == [2e-5] * 10


def test_linear_schedule_runs_from_lr_init_to_lr_final():
    v = [lr_at(s, 11, 1.0, 0.0, "linear") for s in range(11)]
    assert v[0] == 1.0 and v[-1] == 0.0
    assert v[5] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(v, v[1:]))


def test_cosine_schedule_endpoints_and_midpoint():
    assert lr_at(0, 11, 1.0, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_at(5, 11, 1.0, 0.1, "cosine") == pytest.approx(0.55)
    assert lr_at(10, 11, 1.0, 0.1, "cosine") == pytest.approx(0.1)


def test_exp_schedule_is_geometric():
    assert lr_at(0, 11, 1e-3, 1e-5, "exp") == pytest.approx(1e-3)
    assert lr_at(5, 11, 1e-3, 1e-5, "exp") == pytest.approx(1e-4)  # geometric mean at half-way
    assert lr_at(10, 11, 1e-3, 1e-5, "exp") == pytest.approx(1e-5)
    assert lr_at(50, 11, 1e-3, 1e-5, "exp") == pytest.approx(1e-5)  # clamped after the end


def test_warmup_ramps_linearly_then_decay_starts_at_lr_init():
    v = [lr_at(s, 14, 1.0, 0.0, "linear", warmup_steps=4) for s in range(14)]
    assert v[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert v[4] == 1.0 and v[13] == 0.0
    assert v[4 + 9 // 3] == pytest.approx(2 / 3)


# ---- samplers -----------------------------------------------------------------------------------
class ArrayReader:
    """The reader interface over in-memory documents."""

    def __init__(self, docs, dtype=np.uint16):
        self.sizes = np.array([len(d) for d in docs], dtype=np.int32)
        self.tokens = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))

    def __len__(self):
        return len(self.sizes)

    def get(self, i, offset=0, length=None):
        s, e = self.starts[i] + offset, self.starts[i] + self.sizes[i]
        return self.tokens[s:e if length is None else min(e, s + length)]


def test_magic_prime_sampler_visits_every_chunk_once():
    ctx, p = 8, 41  # 41 is prime and 41 % 3 == 2
    reader = ArrayReader([np.arange(ctx * (p + 1) + 1) % 60000])
    sampler = MagicPrimeWindows(reader, ctx, p)
    starts = [magic_prime_start(i, p, ctx) for i in range(p)]
    assert sorted(starts) == [c * ctx for c in range(p)]
    for i in (0, 7, 40):
        x, y = sampler(i)
        assert x[0] == starts[i] and np.array_equal(y, x + 1) and x.shape == (ctx,)


def test_magic_prime_must_be_a_valid_prime_for_the_data():
    reader = ArrayReader([np.arange(8 * 50)])
    with pytest.raises(UserError, match="--magic_prime 43 must be a prime with p % 3 == 2.*use --magic_prime 47"):
        MagicPrimeWindows(reader, 8, 43)


def test_random_windows_are_in_bounds_deterministic_and_seed_dependent():
    reader = ArrayReader([np.arange(100)])
    a, b = RandomWindows(reader, 16, seed=1), RandomWindows(reader, 16, seed=2)
    for g in range(50):
        x, y = a(g)
        assert x.shape == (16,) and np.array_equal(y, x + 1) and 0 <= x[0] <= 100 - 17
        assert np.array_equal(a(g)[0], x)
    assert any(not np.array_equal(a(g)[0], b(g)[0]) for g in range(10))


def test_random_windows_refuse_data_shorter_than_ctx_len_plus_one():
    with pytest.raises(UserError, match="fewer than ctx_len \\+ 1 = 17"):
        RandomWindows(ArrayReader([np.arange(16)]), 16, seed=0)


def test_sft_sampler_masks_prompt_and_padding():
    # doc 0: prompt 5 6 7, response 8 9 0; doc 1: longer than ctx_len+1 (truncated)
    docs = [[5, 6, 7, 8, 9, 0], list(range(1, 13)) + [0]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0] + [1] * 11]
    s = SFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), ctx_len=8, seed=0)
    seen = {}
    for g in range(2):  # the first pass visits each document once
        x, y, m, n = s(g)
        seen[int(x[0])] = (x, y, m, n)
    x, y, m, n = seen[5]
    assert n == 5  # real (non-padding) positions
    assert x.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert y.tolist() == [6, 7, 8, 9, 0, 0, 0, 0]
    assert m.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # predicts 8, 9, 0; prompt and padding excluded
    x, y, m, n = seen[1]
    assert n == 8
    assert x.tolist() == list(range(1, 9)) and y.tolist() == list(range(2, 10))
    assert m.tolist() == [0] + [1] * 7


def test_sft_sampler_refuses_mismatched_masks():
    with pytest.raises(UserError, match="mask files do not match"):
        SFTDocuments(ArrayReader([[1, 2, 0]]), ArrayReader([[0, 1]], np.uint8), 4, 0)


def test_step_samples_are_a_pure_function_of_step_rank_and_position():
    sampler = lambda g: (np.array([g]), np.array([g]))  # noqa: E731
    kw = dict(total_steps=6, world_size=2, accumulate=3, micro_bsz=2)
    full = StepSamples(sampler, start_step=0, rank=1, **kw)
    resumed = StepSamples(sampler, start_step=4, rank=1, **kw)
    assert len(full) == 6 * 3 * 2 and len(resumed) == 2 * 3 * 2
    assert [resumed[j][0].item() for j in range(len(resumed))] == \
           [full[j][0].item() for j in range(4 * 6, len(full))]
    rank0 = StepSamples(sampler, start_step=0, rank=0, **kw)
    numbers = {rank0[j][0].item() for j in range(len(rank0))} | {full[j][0].item() for j in range(len(full))}
    assert numbers == set(range(6 * 3 * 2 * 2))  # ranks never share a sample
    g = global_sample_number(1, 2, 1, rank=1, world_size=2, accumulate=3, micro_bsz=2)
    assert g == ((1 * 3 + 2) * 2 + 1) * 2 + 1


# ---- loss and optimizer -------------------------------------------------------------------------
def test_masked_loss_is_the_mean_over_trained_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    expected = sum(-torch.log_softmax(logits[b, t], -1)[y[b, t]] for b in range(2) for t in range(5)
                   if mask[b, t]) / 4
    assert token_loss(logits, y, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert token_loss(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits.reshape(10, 11), y.reshape(10)).item(), rel=1e-6)


def test_optimizer_groups_hold_trainables_and_decay_only_matrices():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    groups = optimizer_groups(m, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # biases and LayerNorm
    assert len(optimizer_groups(m, 0.0)) == 1


# ---- flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--data_file", "d"], "give --load_model PATH to fine-tune"),
    (["--load_model", "", "--data_file", "d"], "needs --model_preset"),
    (["--load_model", "", "--model_preset", "1.6b", "--data_file", "d"], "use --peft none"),
    (["--load_model", "/nonexistent/model.pth", "--data_file", "d"],
     "--load_model /nonexistent/model.pth does not exist"),
    (["--load_model", "", "--model_preset", "3b", "--n_layer", "2", "--peft", "none"], "not both"),
    (["--load_model", "", "--model_preset", "3b", "--peft", "none"], "--data_file is required"),
    (["--load_model", "", "--n_layer", "2", "--n_embd", "64", "--peft", "none", "--data_file", "d",
      "--lr_schedule", "exp", "--lr_final", "0"], "positive --lr_final"),
    (["--dry_run", "--model_preset", "3b", "--train_parts", "time,wings"], "unknown part\\(s\\) wings"),
    (["--dry_run", "--model_preset", "3b", "--micro_bsz", "0"], "--micro_bsz must be a positive integer"),
])
def test_bad_flag_combinations_are_one_sentence_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_precision_aliases():
    from rwkv_bone.train.args import precision_mode

    for text, mode in (("bf16", "bf16"), ("bf16-mixed", "bf16"), ("32", "fp32"), ("fp32", "fp32")):
        assert precision_mode(parse_args(["--dry_run", "--model_preset", "3b", "--precision", text])) == mode


# ---- optional dependencies --------------------------------------------------------------------------
def test_missing_optional_packages_name_what_to_install(monkeypatch, tmp_path):
    import sys

    from rwkv_bone import plot
    from rwkv_bone.train.callbacks import start_wandb
    from rwkv_bone.train.strategy import build_strategy

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for name in ("deepspeed", "wandb", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(UserError, match="needs DeepSpeed: pip install deepspeed"):
        build_strategy("deepspeed_stage_2", "cpu")
    with pytest.raises(UserError, match="--wandb needs the wandb package: pip install wandb"):
        start_wandb("p", "n", {}, str(tmp_path))
    with pytest.raises(UserError, match="plotting needs matplotlib"):
        plot.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))

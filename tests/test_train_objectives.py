"""DPO and GRPO as a user runs them: make_data on preference records, train.py --objective dpo|grpo,
their logged metrics, GRPO resumed after kill -9, and the configurations refused up front."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_train_helpers import REPO, TRAIN, base_flags, tiny_checkpoint, train_cli

MAKE_DATA = os.path.join(REPO, "make_data.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("objectives")
    vocab = d / "bytes.txt"  # World-format vocab of the 256 bytes: ids 1..256, fits a V=300 model
    vocab.write_text("\n".join(f"{b + 1} {bytes([b])!r} 1" for b in range(256)) + "\n", encoding="utf-8")
    prefs = d / "prefs.jsonl"
    recs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": f"{a * b + 1}."}
            for a in range(1, 4) for b in range(1, 4)]
    recs.append({"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
                 "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "no"}]})
    prefs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": f"#### {a + b}"}) + "\n"
                               for a in range(1, 4) for b in range(1, 3)))
    return {"dir": d, "vocab": str(vocab), "prefs": str(prefs), "prompts": str(prompts),
            "ckpt": tiny_checkpoint(str(d / "tiny.pth"), vocab=300), "digits": digits_checkpoint(str(d / "digits.pth"))}


def digits_checkpoint(path: str) -> str:
    """A tiny model that mostly answers one of the digits 2..5 (byte ids 51..54), so GRPO's rewards
    differ within a group and the adapter really trains (a random model is never right)."""
    tiny_checkpoint(path, vocab=300)
    sd = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(sd["ln_out.bias"].shape, generator=g)
    v = 2.0 * v / v.norm()
    sd["ln_out.weight"] = sd["ln_out.weight"] * 0.1
    sd["ln_out.bias"] = v
    sd["head.weight"][51:55] = 3.0 * v / v.norm()
    torch.save(sd, path)
    return path


def make_data(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, MAKE_DATA, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def rows(proj: str) -> list[dict]:
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pairs(files):
    prefix = str(files["dir"] / "pairs")
    r = make_data(files["prefs"], "--output", prefix, "--tokenizer", files["vocab"])
    assert r.returncode == 0, r.stderr
    assert "10 preference pairs" in r.stdout
    return prefix


def test_make_data_writes_pairs_with_the_sft_template(files, pairs):
    from rwkv_bone.data.binidx import MMapIndexedDataset, load_masks

    tokens = MMapIndexedDataset(pairs)
    masks = load_masks(pairs, tokens)
    assert len(tokens) == 20 and json.load(open(pairs + ".pairs.json"))["pairs"] == 10
    decode = lambda ids: bytes(int(i) - 1 for i in ids if i).decode()  # noqa: E731
    first, second = tokens.get(0), tokens.get(1)
    m0 = masks.get(0).astype(bool)
    assert decode(first[~m0]) == "User: What is 1 plus 1?\n\nAssistant:"
    assert decode(first[m0]) == " 2." and first[-1] == 0
    assert decode(second[~masks.get(1).astype(bool)]) == "User: What is 1 plus 1?\n\nAssistant:"
    assert decode(second[masks.get(1).astype(bool)]) == " 2."  # rejected: 1 * 1 + 1
    conv = tokens.get(18)
    assert decode(conv) == "User: Say hi\n\nAssistant: hi"


def test_make_data_rejected_responses_and_conversations(files, pairs):
    from rwkv_bone.data.binidx import MMapIndexedDataset, load_masks

    tokens = MMapIndexedDataset(pairs)
    masks = load_masks(pairs, tokens)
    rej = tokens.get(1)
    assert bytes(int(i) - 1 for i in rej[masks.get(1).astype(bool)] if i).decode() == " 2."
    assert bytes(int(i) - 1 for i in tokens.get(3)[masks.get(3).astype(bool)] if i).decode() == " 3."  # 1*2+1
    assert bytes(int(i) - 1 for i in tokens.get(19) if i).decode() == "User: Say hi\n\nAssistant: no"


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a"}, "line 2: record has no 'rejected' field"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "line 2: the 'rejected' response is empty"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]},
     "line 2: 'chosen' has no assistant message"),
])
def test_make_data_bad_preference_record_is_one_sentence_and_writes_nothing(files, tmp_path, record, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    r = make_data(src, "--output", tmp_path / "out", "--tokenizer", files["vocab"])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_dpo_first_loss_is_ln2_and_trl_metrics_are_logged(files, pairs, tmp_path):
    proj = str(tmp_path / "dpo")
    r = train_cli(base_flags(files["ckpt"], pairs, proj, objective="dpo", data_type="pairs", dpo_beta=0.1,
                             ctx_len=48, epoch_steps=3, epoch_count=1, lr_init=2e-2))
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(proj)
    assert len(got) == 3
    assert abs(float(got[0]["loss"]) - math.log(2)) < 1e-6
    for row in got:
        for k in ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin"):
            assert math.isfinite(float(row[k]))
        assert float(row["rewards_margin"]) == pytest.approx(
            float(row["rewards_chosen"]) - float(row["rewards_rejected"]), abs=2e-6)
    assert float(got[0]["rewards_margin"]) == 0
    assert float(got[-1]["loss"]) < math.log(2)  # the policy moved towards the chosen answers
    assert os.path.isfile(os.path.join(proj, "rwkv-0.pth"))


def grpo_flags(files, proj, **over):
    opts = dict(objective="grpo", reward="gsm8k", tokenizer=files["vocab"], num_generations=4, max_new_tokens=1,
                temperature=1.0, grpo_beta=0.04, epoch_steps=3, epoch_count=2, lr_init=2e-2, micro_bsz=2,
                peft="lora", lora_r=4, bone_b=None)
    opts.update(over)
    return base_flags(files["digits"], files["prompts"], proj, **opts)


def test_grpo_run_logs_its_metrics(files, tmp_path):
    proj = str(tmp_path / "grpo")
    r = train_cli(grpo_flags(files, proj, epoch_count=1))
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(proj)
    assert len(got) == 3
    for row in got:
        assert float(row["completion_tokens"]) == 1
        assert 0 <= float(row["reward_mean"]) <= 1 and float(row["reward_std"]) >= 0
        assert float(row["kl"]) >= 0 and 0 <= float(row["clip_fraction"]) <= 1
    assert float(got[0]["kl"]) == pytest.approx(0, abs=1e-6)  # the policy starts at the reference


def state_step(proj: str) -> int:
    path = os.path.join(proj, "last-state.pth")
    return int(torch.load(path, weights_only=True)["step"]) if os.path.isfile(path) else -1


def kill_when(flags: list[str], ready) -> None:
    """Start train.py with `flags` and SIGKILL it once ready() holds (or after 240 s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, TRAIN, *flags], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def assert_same_run(proj_a: str, proj_b: str) -> None:
    """The same final adapter, bit for bit, and the same logged losses."""
    a = torch.load(os.path.join(proj_a, "rwkv-1.pth"), weights_only=True)
    b = torch.load(os.path.join(proj_b, "rwkv-1.pth"), weights_only=True)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert [r["loss"] for r in rows(proj_a)] == [r["loss"] for r in rows(proj_b)]


def test_grpo_resumed_after_sigkill_ends_with_the_same_adapter(files, tmp_path):
    proj_a, proj_b = str(tmp_path / "a"), str(tmp_path / "b")
    r = train_cli(grpo_flags(files, proj_a))
    assert r.returncode == 0, r.stderr[-2000:]
    flags_b = grpo_flags(files, proj_b, save_every_steps=1)
    kill_when(flags_b, lambda: state_step(proj_b) >= 2)
    assert 2 <= state_step(proj_b) < 6
    r = train_cli(flags_b + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(proj_a, proj_b)


def test_grpo_iterations_reuse_rollouts_and_clip_from_the_second_update(files, tmp_path):
    proj = str(tmp_path / "iters")
    r = train_cli(grpo_flags(files, proj, grpo_iterations=2, epoch_steps=4, epoch_count=1, lr_init=0.3))
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(proj)
    assert len(got) == 4
    assert [float(row["clip_fraction"]) for row in got[0::2]] == [0, 0]  # generation steps: rho = 1
    assert any(float(row["clip_fraction"]) > 0 for row in got[1::2])
    for first, second in zip(got[0::2], got[1::2]):  # the same rollouts serve both steps
        assert first["reward_mean"] == second["reward_mean"] and first["reward_std"] == second["reward_std"]
    assert float(got[0]["reward_std"]) > 0


ITERATIONS = dict(grpo_iterations=2, epoch_steps=4, epoch_count=2, save_every_steps=2, lr_init=0.1)


@pytest.fixture(scope="module")
def iterations_run(files):
    """One uninterrupted --grpo_iterations run: what the interrupted runs below must end as."""
    proj = str(files["dir"] / "iterations-uninterrupted")
    r = train_cli(grpo_flags(files, proj, **ITERATIONS))
    assert r.returncode == 0, r.stderr[-2000:]
    return proj


def test_grpo_iterations_resumed_after_sigkill_end_with_the_same_adapter(files, iterations_run, tmp_path):
    proj_a, proj_b = iterations_run, str(tmp_path / "b")
    flags_b = grpo_flags(files, proj_b, **ITERATIONS)
    kill_when(flags_b, lambda: os.path.isfile(os.path.join(proj_b, "metrics.csv")) and len(rows(proj_b)) >= 3)
    assert state_step(proj_b) in (2, 4, 6)  # states only between batches of rollouts
    r = train_cli(flags_b + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(proj_a, proj_b)
    assert any(float(r["clip_fraction"]) > 0 for r in rows(proj_a))


def test_grpo_iterations_stopped_by_my_exit_tokens_between_batches_and_extended_end_alike(files, iterations_run,
                                                                                          tmp_path):
    # --my_exit_tokens may only end a --grpo_iterations run between batches of rollouts (inside one
    # it is refused, see below), so the extended run regenerates exactly the batch it would have had.
    proj_a, proj_b = iterations_run, str(tmp_path / "b")
    flags_b = grpo_flags(files, proj_b, **ITERATIONS)
    r = train_cli(flags_b + ["--my_exit_tokens", str(2 * 2 * 16)])  # 2 steps of 2 x 16 tokens
    assert r.returncode == 0, r.stderr[-2000:]
    assert state_step(proj_b) == 2
    r = train_cli(flags_b + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(proj_a, proj_b)


@pytest.mark.parametrize("over,message", [
    ({"grpo_iterations": 2}, "make --epoch_steps and --save_every_steps multiples of 2"),
    ({"grpo_iterations": 2, "epoch_steps": 4, "my_exit_tokens": 3 * 2 * 16},  # 3 steps of 2 x 16 tokens
     "ends the run after step 3, inside a batch of rollouts that --grpo_iterations 2 reuses for 2 steps"),
    ({"num_generations": 1}, "--num_generations 1: GRPO compares the completions of each prompt with each other, so it needs at least 2"),
    ({"reward": "bleu"}, "unknown reward 'bleu'; choose one of gsm8k, math, exact (eval.py's scorers)"),
    ({"peft": "none"}, "with --peft none would be a second whole model; use --grpo_beta 0 or an adapter"),
])
def test_grpo_configurations_that_cannot_work_are_refused_before_writing(files, tmp_path, over, message):
    proj = str(tmp_path / "refused")
    r = train_cli(grpo_flags(files, proj, **over))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(proj)


def test_dpo_on_a_prefix_that_is_not_pairs_is_refused(files, tmp_path):
    from test_train_helpers import pattern_data

    data = pattern_data(str(tmp_path / "plain"))
    proj = str(tmp_path / "refused")
    r = train_cli(base_flags(files["ckpt"], data, proj, objective="dpo", data_type="pairs"))
    assert r.returncode == 2 and "--data_type pairs needs a pair dataset" in r.stderr
    assert not os.path.exists(proj)
    r = train_cli(base_flags(files["ckpt"], data, proj, objective="dpo", data_type="sft"))
    assert r.returncode == 2 and "--objective dpo needs preference pairs" in r.stderr

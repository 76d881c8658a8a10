"""GRPO under DeepSpeed ZeRO-3: the synced sampler (objectives/synced.py) equals decode.sample_batch
on one process, makes the busiest process's number of model calls, and two CPU processes train the
adapter ZeRO-2 trains, on a model whose weights ZeRO-3 really slices."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import random_model
from rwkv_bone.decode import sample_batch
from rwkv_bone.peft import apply_peft
from rwkv_bone.train.objectives.grpo import GRPOSettings, sample_rollouts
from rwkv_bone.train.objectives.synced import sample_batch_synced
from test_train_helpers import base_flags, train_cli

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold: smaller tensors stay whole


class CountingModel(torch.nn.Module):
    """The model, counting forward_with_state calls (what gathers ZeRO-3 weights)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner, self.config, self.emb, self.calls = model, model.config, model.emb, 0

    def forward_with_state(self, idx, state=None):
        self.calls += 1
        return self.inner.forward_with_state(idx, state)


def stops_often(model):
    """Point the head's end-of-text row along the mean hidden state, so about one token in five
    ends a row (rows then end at different steps)."""
    with torch.no_grad():
        h = model.forward_features(torch.randint(1, 300, (4, 10), generator=torch.Generator().manual_seed(0)))[0]
        mean = h.mean((0, 1))
        model.head.weight[0] = 4.5 * mean / mean.norm() ** 2
    return model


def _flat(groups):
    return [(r.tokens, r.logps, r.stopped) for g in groups for r in g]


@pytest.mark.parametrize("method,temperature,top_p,limit", [
    ("none", 1.0, 1.0, None), ("bone", 0.7, 0.9, 200), ("lora", 1.3, 1.0, 250), ("state", 1.0, 0.95, None)])
def test_synced_sampler_draws_what_sample_batch_draws(method, temperature, top_p, limit):
    model = stops_often(random_model(seed=4).eval())
    if method != "none":
        apply_peft(model, method, **{"bone": {"bone_b": 16}, "lora": {"lora_r": 4}, "state": {}}[method])
        with torch.no_grad():  # a non-zero adapter, so its forward and step paths both matter
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    prompts = [[5, 9, 2, 7], [3], [8, 1, 1, 4, 6, 2]]
    opts = dict(temperature=temperature, top_p=top_p, vocab_limit=limit)
    want = sample_batch(model, prompts, 3, 9, generator=torch.Generator().manual_seed(7), **opts)
    got = sample_batch_synced(model, prompts, 3, 9, generator=torch.Generator().manual_seed(7), **opts)
    assert [r[0] for r in _flat(got)] == [r[0] for r in _flat(want)]
    assert [r[2] for r in _flat(got)] == [r[2] for r in _flat(want)]
    assert len({len(r[0]) for r in _flat(want)}) > 1  # some rows ended early (token 0), some ran on
    for (_, a, _), (_, b, _) in zip(_flat(got), _flat(want)):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_process_whose_rows_end_first_calls_the_model_as_often_as_the_busiest():
    # Another process (simulated by `most`) needs 5 prefill calls and decodes for 12 steps; this one
    # has 2 prompts (2 calls) and at most 3 tokens. It idles to match, and draws what it draws alone.
    model = stops_often(random_model(seed=5).eval())
    prompts, seen = [[5, 9], [3, 3, 3]], []

    def most(n):
        seen.append(n)
        return 5 if len(seen) == 1 else max(n, 12 - len(seen) + 1)

    counting = CountingModel(model)
    got = sample_batch_synced(counting, prompts, 2, 3, generator=torch.Generator().manual_seed(1), most=most)
    want = sample_batch(model, prompts, 2, 3, generator=torch.Generator().manual_seed(1))
    assert [r[0] for r in _flat(got)] == [r[0] for r in _flat(want)]
    assert seen[0] == 2 and seen[-1] == 0            # own prefill calls asked first, done last
    assert counting.calls == 5 + len(seen) - 2         # prefill to 5, then one call per round but the last


def test_synced_rollouts_pad_rows_to_the_longest_over_the_processes():
    model = stops_often(random_model(seed=6).eval())
    s = GRPOSettings(num_generations=2, max_new_tokens=3)
    alone = sample_rollouts(model, [[4, 2]], lambda i, t: float(len(t) % 2), s, torch.Generator().manual_seed(0))
    padded = sample_rollouts(model, [[4, 2]], lambda i, t: float(len(t) % 2), s, torch.Generator().manual_seed(0),
                             most=lambda n: max(n, 11) if n else 0)  # a process with longer rows
    T = alone.x.shape[1]
    assert padded.x.shape[1] == 11 > T
    for a, b in ((alone.x, padded.x), (alone.y, padded.y), (alone.mask, padded.mask)):
        assert torch.equal(b[:, :T], a) and not b[:, T:].any()
    assert torch.equal(alone.advantages, padded.advantages)


# ---- two CPU processes ---------------------------------------------------------------------------

def sliced_digits_checkpoint(path: str, sliced: bool = True) -> str:
    """test_train_objectives' digits model (it mostly says one of 2..5, a space or stops, so GRPO's
    rewards differ within a group), with TimeMix's mixing/decay projections, the ffn and the head
    over DeepSpeed's persistence threshold: ZeRO-3 slices them, and RWKV6.step could not read them.
    sliced=False: every tensor under the threshold (ZeRO-3 keeps them whole on every process)."""
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6

    torch.manual_seed(0)
    dims = dict(vocab_size=2048, dim_maa=320, dim_decay=1600, dim_ffn=1600) if sliced else dict(vocab_size=300)
    cfg = RWKV6Config(n_layer=2, n_embd=64, **dims)
    model = RWKV6.from_config(cfg, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("output.weight", "ffn.value.weight", "ffn.receptance.weight")):
                p.normal_(0, 0.05)
    sd = model.official_state_dict()
    v = torch.randn(sd["ln_out.bias"].shape, generator=torch.Generator().manual_seed(0))
    sd["ln_out.weight"] = sd["ln_out.weight"] * 0.1
    sd["ln_out.bias"] = 2.0 * v / v.norm()
    sd["head.weight"][[0, 33, 51, 52, 53, 54]] = 3.0 * v / v.norm()  # end of text, " ", "2".."5"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_zero3")
    vocab = d / "bytes.txt"  # World-format vocab of the 256 bytes: ids 1..256
    vocab.write_text("\n".join(f"{b + 1} {bytes([b])!r} 1" for b in range(256)) + "\n", encoding="utf-8")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": f"#### {a + b}"}) + "\n"
                               for a in range(1, 4) for b in range(1, 3)))
    return {"dir": d, "vocab": str(vocab), "prompts": str(prompts), "ckpt": sliced_digits_checkpoint(str(d / "m.pth")),
            "whole": sliced_digits_checkpoint(str(d / "whole.pth"), sliced=False)}


def grpo_run(sliced, proj, strategy, peft, ckpt="ckpt"):
    extra = {"bone": dict(bone_b=16), "lora": dict(bone_b=None, lora_r=4), "state": dict(bone_b=None)}[peft]
    flags = base_flags(sliced[ckpt], sliced["prompts"], proj, objective="grpo", reward="gsm8k",
                       tokenizer=sliced["vocab"], num_generations=4, max_new_tokens=3, grpo_beta=0.04,
                       epoch_steps=2, epoch_count=1, lr_init=2e-2, micro_bsz=2, strategy=strategy, devices=2,
                       peft=peft, **extra)
    r = train_cli(flags)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return proj


@pytest.fixture(scope="module")
def bone_zero2(sliced):
    return grpo_run(sliced, str(sliced["dir"] / "zero2"), "deepspeed_stage_2", "bone")


def _logged(proj):
    from test_train_objectives import rows

    return [{k: v for k, v in r.items() if k not in ("kt/s", "peak_mem_mb")} for r in rows(proj)]


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["bone", "lora", "state"])  # state: a TimeMix tensor RWKV6.step reads
def test_grpo_under_zero3_trains_what_zero2_trains_and_saves_what_merges(sliced, bone_zero2, tmp_path, peft):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import load_adapter, merge_state_dict, read_adapter_file

    base_sd = torch.load(sliced["ckpt"], weights_only=True)
    sliced_keys = [k for k, t in base_sd.items() if t.numel() > PERSISTENCE_THRESHOLD]
    assert any(".att.time_maa_w1" in k for k in sliced_keys) and "head.weight" in sliced_keys
    proj = grpo_run(sliced, str(tmp_path / "zero3"), "deepspeed_stage_3", peft)
    zero2 = bone_zero2 if peft == "bone" else grpo_run(sliced, str(tmp_path / "zero2"), "deepspeed_stage_2", peft)
    got = _logged(proj)
    assert len(got) == 2 and float(got[1]["kl"]) > 0   # the reference pass ran (adapter swapped out)
    assert any(float(r["reward_std"]) > 0 for r in got) and float(got[0]["completion_tokens"]) < 3
    # Same rollouts, rewards and losses (as logged); the adapters differ only by ZeRO-3's own
    # arithmetic on sliced weights (its linear function, its gradient partitions): on a model small
    # enough that nothing is sliced the two runs end bit for bit equal.
    assert got == _logged(zero2)
    path = os.path.join(proj, "rwkv-0.pth")
    a, b = (torch.load(os.path.join(p, "rwkv-0.pth"), weights_only=True) for p in (zero2, proj))
    assert a.keys() == b.keys()
    for k, t in a.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            torch.testing.assert_close(b[k], t, rtol=1e-3, atol=2e-5, msg=k)
    x = torch.randint(1, 257, (1, 12))
    base = RWKV6.from_state_dict(base_sd).eval()
    trained = RWKV6.from_state_dict(base_sd).eval()
    load_adapter(trained, path)
    merged = RWKV6.from_state_dict(merge_state_dict(base_sd, read_adapter_file(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), trained(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(trained(x), base(x))  # the run really trained


@pytest.mark.slow
def test_grpo_under_zero3_on_weights_it_keeps_whole_equals_zero2_bit_for_bit(sliced, tmp_path):
    # Nothing sliced: ZeRO-3's rounding differences go, and the synced sampler's rollouts, the padded
    # rows and the reference swap leave the run ZeRO-2's to the last bit.
    assert all(t.numel() <= PERSISTENCE_THRESHOLD for t in torch.load(sliced["whole"], weights_only=True).values())
    runs = [grpo_run(sliced, str(tmp_path / s), s, "bone", ckpt="whole")
            for s in ("deepspeed_stage_2", "deepspeed_stage_3")]
    assert _logged(runs[0]) == _logged(runs[1]) and any(float(r["reward_std"]) > 0 for r in _logged(runs[0]))
    a, b = (torch.load(os.path.join(p, "rwkv-0.pth"), weights_only=True) for p in runs)
    assert a.keys() == b.keys()
    for k, t in a.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b[k]), k

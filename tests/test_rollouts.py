"""GRPO rollouts: sampled log-probs equal the training forward's, seeds repeat, and the reference
(initial weights swapped in) equals the base model exactly."""
import pytest
import torch

from conftest import random_model
from rwkv_bone.decode import EOD_ID, sample_batch
from rwkv_bone.peft import apply_peft
from rwkv_bone.train.objectives.reference import InitialWeights


def _forward_logps(model, prompt, tokens, temperature):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids)[0].float() / temperature                     # (T, V)
    lp = torch.log_softmax(logits, dim=-1)
    P = len(prompt)
    return [lp[P - 1 + t, tok].item() for t, tok in enumerate(tokens)]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logps_equal_the_training_forward(temperature, top_p):
    model = random_model(seed=1).eval()
    prompts = [[5, 9, 2, 7], [3, 1]]
    g = torch.Generator().manual_seed(0)
    out = sample_batch(model, prompts, 3, 12, temperature=temperature, top_p=top_p, generator=g)
    assert [len(x) for x in out] == [3, 3]
    for prompt, group in zip(prompts, out):
        for r in group:
            assert 1 <= len(r.tokens) <= 12 and len(r.logps) == len(r.tokens)
            assert (r.stopped == "eod") == (r.tokens[-1] == EOD_ID)
            assert r.logps == pytest.approx(_forward_logps(model, prompt, r.tokens, temperature), abs=1e-4)


def test_same_seed_same_samples_other_seed_other_samples():
    model = random_model(seed=2).eval()
    run = lambda s: [[r.tokens for r in grp] for grp in sample_batch(  # noqa: E731
        model, [[4, 4, 4]], 4, 10, generator=torch.Generator().manual_seed(s))]
    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("method,opts", [("bone", {"bone_b": 16}), ("lora", {"lora_r": 4}),
                                         ("miss", {"miss_r": 8}), ("state", {})])
def test_reference_pass_equals_the_base_model_exactly(method, opts):
    base = random_model(seed=3).eval()
    ids = torch.tensor([[1, 5, 9, 2, 8, 3, 3, 7]])
    with torch.no_grad():
        want = base(ids)
    model = random_model(seed=3).eval()
    apply_peft(model, method, **opts)
    ref = InitialWeights(model)
    with torch.no_grad():  # train the adapter away from its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        moved = model(ids)
        with ref.swapped_in(model):
            again = model(ids)
        after = model(ids)
    assert not torch.equal(moved, want)
    assert torch.equal(again, want)
    assert torch.equal(after, moved)

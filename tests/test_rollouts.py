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


def test_dpo_batch_loss_is_ln2_at_the_start_and_moves_the_adapter():
    from rwkv_bone.train.objectives.dpo import dpo_batch_loss

    model = random_model(seed=4, dtype=torch.float64)
    apply_peft(model, "bone", bone_b=16)
    ref = InitialWeights(model)
    torch.manual_seed(0)
    x = torch.randint(1, 50, (3, 2, 9))
    y = torch.randint(1, 50, (3, 2, 9))
    mask = torch.zeros(3, 2, 9)
    mask[..., 4:] = 1
    loss, m = dpo_batch_loss(model, ref, x, y, mask, 0.1)
    assert abs(loss.item() - 0.6931471805599453) < 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_grpo_batch_rewards_groups_and_masks_completion_tokens():
    from rwkv_bone.train.objectives.grpo import GRPOSettings, completion_rows, grpo_batch_loss

    x, y, mask = completion_rows([[7, 8, 9], [5]], [[1, 2, 0], [3]])
    assert x.tolist() == [[7, 8, 9, 1, 2], [5, 0, 0, 0, 0]]
    assert y.tolist() == [[8, 9, 1, 2, 0], [3, 0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 0, 0, 0, 0]]
    model = random_model(seed=5)
    apply_peft(model, "lora", lora_r=4)
    ref = InitialWeights(model)
    s = GRPOSettings(num_generations=4, max_new_tokens=6, beta=0.04)
    reward = lambda i, toks: float(len(toks) % 2)  # noqa: E731
    loss, m = grpo_batch_loss(model, ref, [[3, 4, 5], [6, 2]], reward, s, torch.Generator().manual_seed(1))
    loss.backward()
    assert set(m) == {"kl", "clip_fraction", "reward_mean", "reward_std", "completion_tokens"}
    assert 1 <= m["completion_tokens"].item() <= 6
    assert m["kl"].item() == pytest.approx(0.0, abs=1e-9)  # policy == reference at the start
    assert m["clip_fraction"].item() == 0

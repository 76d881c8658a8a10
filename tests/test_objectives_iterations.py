"""--grpo_iterations: rollouts generated once and reused for several policy updates (TRL's
num_iterations), pi_old fixed at generation time, and the prompt order that repeats each batch."""
import pytest
import torch

from conftest import random_model
from rwkv_bone.peft import apply_peft
from rwkv_bone.train.data import PromptOrder
from rwkv_bone.train.objectives.grpo import GRPOSettings, rollout_loss, sample_rollouts
from rwkv_bone.train.objectives.reference import InitialWeights


def _parity(i, toks):
    return float(toks[0] % 2)


def _model():
    model = random_model(seed=6)
    apply_peft(model, "lora", lora_r=4)
    return model


def test_reused_rollouts_clip_only_from_the_second_update():
    model = _model()
    s = GRPOSettings(num_generations=4, max_new_tokens=3, beta=0.04, epsilon=0.2)
    ref = InitialWeights(model)
    ro = sample_rollouts(model, [[3, 4, 5], [6, 2], [9]], _parity, s, torch.Generator().manual_seed(0))
    assert ro.advantages.abs().sum() > 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    clip, kl = [], []
    for _ in range(3):
        loss, m = rollout_loss(model, ref, ro, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip.append(m["clip_fraction"].item())
        kl.append(m["kl"].item())
    assert clip[0] == 0 and kl[0] == pytest.approx(0, abs=1e-9)
    assert clip[1] > 0 and clip[2] > 0          # pi_old stays the policy at generation time
    assert ro.old_logp is not None and not ro.old_logp.requires_grad


def test_first_update_is_the_plain_policy_gradient():
    # pi_old = pi at the first update: the gradient is that of -mean_i A_i mean_t log pi(o_it).
    from rwkv_bone.train.objectives.logps import token_logps

    s = GRPOSettings(num_generations=3, max_new_tokens=4)
    model = _model()
    with torch.no_grad():  # a non-zero adapter, so the gradient is not trivially zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    ro = sample_rollouts(model, [[3, 4, 5], [6, 2]], _parity, s, torch.Generator().manual_seed(1))
    loss, m = rollout_loss(model, None, ro, s)
    got = torch.autograd.grad(loss, params)
    logp = token_logps(model, ro.x, ro.y, s.temperature)
    plain = -(ro.advantages * (logp * ro.mask).sum(-1) / ro.mask.sum(-1)).mean()
    want = torch.autograd.grad(plain, params)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and m["clip_fraction"].item() == 0
    assert any(w.abs().sum() > 0 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_prompt_order_repeats_each_batch_for_k_steps():
    per_step = 4  # micro_bsz 2 x accumulation 2 x 1 process
    one, two = PromptOrder(11, 5), PromptOrder(11, 5, iterations=2, per_step=per_step)
    assert [one(g) for g in range(30)] == [PromptOrder(11, 5, 1, per_step)(g) for g in range(30)]
    for step in range(6):
        batch = [two(step * per_step + j) for j in range(per_step)]
        assert batch == [one((step // 2) * per_step + j) for j in range(per_step)]

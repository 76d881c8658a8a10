"""DPO / IPO and GRPO losses against explicit float64 computations written out term by term."""
import math

import pytest
import torch

from rwkv_bone.train.objectives.dpo import SeqLogp, dpo_loss, sequence_logps
from rwkv_bone.train.objectives.grpo import group_advantages, grpo_loss

D = torch.float64


def _seq(total, count):
    return SeqLogp(torch.tensor(total, dtype=D, requires_grad=True), torch.tensor(count, dtype=D))


def test_sequence_logps_sums_the_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=D)
    y = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    s = sequence_logps(logits, y, mask)
    for b in range(2):
        want = sum(torch.log_softmax(logits[b, t], -1)[y[b, t]].item() for t in range(5) if mask[b, t])
        assert s.total[b].item() == pytest.approx(want, abs=1e-12)
        assert s.count[b].item() == mask[b].sum().item()


def test_dpo_sigmoid_is_ln2_when_policy_equals_reference():
    pc, pr = _seq([-3.0, -7.5], [3, 4]), _seq([-2.0, -9.0], [2, 5])
    loss, m = dpo_loss(pc, pr, SeqLogp(pc.total.detach(), pc.count), SeqLogp(pr.total.detach(), pr.count), 0.1)
    assert abs(loss.item() - math.log(2.0)) < 1e-12
    assert m["rewards_margin"].item() == 0 and m["rewards_accuracy"].item() == 0


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_match_explicit_float64(kind):
    beta = 0.3
    pc, pr = _seq([-3.0, -7.5, -1.0], [3, 4, 1]), _seq([-2.0, -9.0, -4.0], [2, 5, 2])
    rc, rr = _seq([-3.5, -7.0, -1.5], [3, 4, 1]), _seq([-2.5, -8.0, -3.0], [2, 5, 2])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, kind)
    loss.backward()
    n = 3
    want, g_pc, g_pr, chosen_r, rejected_r = 0.0, [], [], [], []
    for i in range(n):
        if kind == "ipo":
            c = pc.total[i].item() / pc.count[i].item() - rc.total[i].item() / rc.count[i].item()
            r = pr.total[i].item() / pr.count[i].item() - rr.total[i].item() / rr.count[i].item()
            d = c - r
            want += (d - 1 / (2 * beta)) ** 2 / n
            g_pc.append(2 * (d - 1 / (2 * beta)) / n / pc.count[i].item())
            g_pr.append(-2 * (d - 1 / (2 * beta)) / n / pr.count[i].item())
        else:
            c = pc.total[i].item() - rc.total[i].item()
            r = pr.total[i].item() - rr.total[i].item()
            d = c - r
            want += -math.log(1 / (1 + math.exp(-beta * d))) / n
            s = 1 / (1 + math.exp(beta * d))  # d/dd of -log sigmoid(beta d) = -beta * sigmoid(-beta d)
            g_pc.append(-beta * s / n)
            g_pr.append(beta * s / n)
        chosen_r.append(beta * c)
        rejected_r.append(beta * r)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert pc.total.grad.tolist() == pytest.approx(g_pc, abs=1e-12)
    assert pr.total.grad.tolist() == pytest.approx(g_pr, abs=1e-12)
    assert m["rewards_chosen"].item() == pytest.approx(sum(chosen_r) / n, abs=1e-12)
    assert m["rewards_rejected"].item() == pytest.approx(sum(rejected_r) / n, abs=1e-12)
    assert m["rewards_margin"].item() == pytest.approx((sum(chosen_r) - sum(rejected_r)) / n, abs=1e-12)
    acc = sum(c > r for c, r in zip(chosen_r, rejected_r)) / n
    assert m["rewards_accuracy"].item() == pytest.approx(acc)


def test_group_advantages_by_hand_and_all_equal_group_is_zero():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=D)
    a = group_advantages(r)
    for p in range(3):
        mean = sum(r[p].tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r[p].tolist()) / 3)  # unbiased, as TRL
        assert a[p].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in r[p].tolist()], abs=1e-12)
    assert a[1].abs().max().item() == 0
    assert group_advantages(r, scale=False)[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 1))


def _explicit_grpo(logp, old, ref, adv, mask, beta, eps, kind, max_new):
    N, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(N)]
    clip_active = kl_sum = 0.0
    for i in range(N):
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            per[i][t] = -min(unclipped, clipped) + beta * kl
            kl_sum += kl
            clip_active += (rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0)
    ntok = sum(sum(row) for row in mask)
    if kind == "grpo":
        loss = sum(sum(per[i]) / sum(mask[i]) for i in range(N)) / N
    elif kind == "dapo":
        loss = sum(sum(row) for row in per) / ntok
    else:
        loss = sum(sum(row) for row in per) / (N * max_new)
    return loss, kl_sum / ntok, clip_active / ntok


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_explicit_computation_with_clip_and_equal_group(kind):
    eps, beta, max_new = 0.2, 0.05, 4
    # Two groups of two: the first with different rewards, the second all equal (advantage 0).
    adv = group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)).flatten()
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.5, -0.3, 0.0, 0.0],
                        [-0.7, -0.7, -0.7, -0.7], [-2.0, -1.0, -1.0, 0.0]], dtype=D)
    # ratios just inside / exactly at / beyond the clip boundary on both sides
    shift = torch.tensor([[math.log(1.19), math.log(1.2), math.log(1.5), 0.0],
                          [math.log(0.81), math.log(0.5), 0.0, 0.0],
                          [0.1, -0.1, 0.0, 0.3], [0.0, 0.2, -0.2, 0.0]], dtype=D)
    logp = (old + shift).clone().requires_grad_(True)
    ref = old - 0.1
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    loss, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, epsilon=eps, kind=kind,
                        max_new_tokens=max_new)
    want, kl, clip = _explicit_grpo(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                    mask.tolist(), beta, eps, kind, max_new)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["kl"].item() == pytest.approx(kl, abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(clip, abs=1e-12)
    assert 0 < m["clip_fraction"].item() < 1
    loss.backward()
    # gradient by central differences of the explicit form
    h = 1e-6
    for (i, t) in [(0, 0), (0, 2), (1, 1), (2, 0), (3, 1)]:
        lp = logp.detach().clone()
        lp[i, t] += h
        up = _explicit_grpo(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, eps, kind, max_new)[0]
        lp[i, t] -= 2 * h
        dn = _explicit_grpo(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, eps, kind, max_new)[0]
        assert logp.grad[i, t].item() == pytest.approx((up - dn) / (2 * h), abs=1e-7)
    assert logp.grad[0, 3].item() == 0  # masked token


def test_grpo_one_update_is_minus_advantage_times_grad_logp():
    # mu = 1: pi_old = pi numerically, rho = 1, and without KL the gradient is -A / len per token.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], dtype=D, requires_grad=True)
    adv = torch.tensor([0.7, -0.7], dtype=D)
    loss, m = grpo_loss(logp, logp.detach(), adv, torch.ones(2, 2), kind="grpo")
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.7 / 4, -0.7 / 4, 0.7 / 4, 0.7 / 4], abs=1e-12)
    assert m["clip_fraction"].item() == 0 and m["kl"].item() == 0

"""decode.draw (the sampler behind GRPO rollouts): the drawn frequencies are the probabilities."""
import torch

from rwkv_bone.decode import draw, sample_rows


def test_draw_frequencies_match_the_probabilities_and_skip_zero_mass():
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros_like(p)
    for _ in range(n // 100):
        idx = draw(p.repeat_interleave(100, dim=0), g).view(2, 100)
        for r in range(2):
            counts[r] += torch.bincount(idx[r], minlength=5)
    freq = counts / n
    assert counts[0, 1] == 0 and counts[0, 4] == 0 and counts[1, 3] == n
    # binomial sd at p = 0.5, n = 20000 is 0.0035: 5 sd
    assert torch.allclose(freq[0], p[0], atol=0.018)


def test_draw_handles_unnormalised_rows_and_rounding_to_the_total():
    p = torch.tensor([[2.0, 0.0, 6.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    got = torch.stack([draw(p, g) for _ in range(4000)]).flatten()
    assert set(got.tolist()) <= {0, 2}
    assert abs((got == 2).float().mean().item() - 0.75) < 0.03


def test_sample_rows_is_seeded_and_reports_the_drawn_log_probs():
    logits = torch.randn(6, 50)
    a = sample_rows(logits, 0.8, 0.9, torch.Generator().manual_seed(3))
    b = sample_rows(logits, 0.8, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    ref = torch.log_softmax(logits / 0.8, dim=-1).gather(-1, a[0][:, None]).squeeze(-1)
    assert torch.allclose(a[1], ref)
    # top_p 0.9 never draws from outside the nucleus
    probs = torch.softmax(logits / 0.8, dim=-1)
    sp, order = torch.sort(probs, dim=-1, descending=True)
    inside = (torch.cumsum(sp, -1) - sp) < 0.9
    for r in range(6):
        allowed = set(order[r][inside[r]].tolist())
        for s in range(50):
            t, _ = sample_rows(logits[r:r + 1], 0.8, 0.9, torch.Generator().manual_seed(s))
            assert t.item() in allowed

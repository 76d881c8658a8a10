"""The fast load and decode paths against the plain ones: the one-pass cast + NaN check, and the
chunked batched linear of RWKV6.step."""
import pytest
import torch

from rwkv_bone import checkpoint
from rwkv_bone.checkpoint import converted_checked
from rwkv_bone.errors import UserError


def test_converted_checked_equals_a_plain_cast_and_finds_a_nan_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(10, 30, generator=g).bfloat16(), "b": torch.randn(7, generator=g),
          "blocks.0.att.time_state": torch.randn(2, 4, 4, generator=g), "i": torch.arange(3)}
    out = converted_checked(sd, torch.float32, "cpu", "f.pth")
    assert torch.equal(out["a"], sd["a"].float()) and out["a"].dtype == torch.float32
    assert out["b"] is sd["b"] and out["i"] is sd["i"]
    assert out["blocks.0.att.time_state"] is sd["blocks.0.att.time_state"]
    half = converted_checked(sd, torch.bfloat16, "cpu", "f.pth")
    assert half["blocks.0.att.time_state"].dtype == torch.float32 and half["b"].dtype == torch.bfloat16
    bad = dict(sd, a=sd["a"].clone())
    bad["a"][9, 29] = float("nan")  # last chunk
    with pytest.raises(UserError, match="f.pth tensor a holds NaN"):
        converted_checked(bad, torch.float32, "cpu", "f.pth")
    bad = dict(sd, b=sd["b"].clone())
    bad["b"][3] = float("inf")  # no cast: checked in place
    with pytest.raises(UserError, match="tensor b holds NaN"):
        converted_checked(bad, torch.float32, "cpu", "f.pth")


@pytest.mark.parametrize("rows", [3, 8, 17])
def test_blocked_step_linear_equals_the_plain_linear(rows, monkeypatch):
    from rwkv_bone import gemv
    from rwkv_bone.model import STEP_BLOCK_ROWS, _step_linear

    monkeypatch.setattr(gemv, "_enabled", False)  # the bmm path, not the few-row kernel

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 16 * STEP_BLOCK_ROWS, bias=False)
    x = torch.randn(rows, 96)
    ref = (x.double() @ lin.weight.double().T)
    out = _step_linear(lin, x)
    assert out.shape == (rows, 16 * STEP_BLOCK_ROWS)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, lin(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(_step_linear(lin, x[:1]), lin(x[:1]))  # batch 1: the plain path


@pytest.mark.parametrize("kernel", [False, True])
def test_batched_step_at_a_width_that_uses_the_blocked_linear_equals_rows_alone(kernel, monkeypatch):
    from rwkv_bone import gemv
    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.decode import cat_states, feed
    from rwkv_bone.model import RWKV6

    monkeypatch.setattr(gemv, "_enabled", kernel)
    torch.manual_seed(0)
    model = RWKV6.from_config(RWKV6Config(n_layer=1, n_embd=1024, vocab_size=1024)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    fed = [feed(model, p) for p in prompts]
    tokens = torch.tensor([11, 12, 13, 14])
    logits, state = model.step(tokens, cat_states([st for _, st in fed]))
    for row, (p, t) in enumerate(zip(prompts, tokens.tolist())):
        ref, _ = model.forward_with_state(torch.tensor([p + [t]]))
        assert torch.allclose(logits[row], ref[0, -1], rtol=1e-4, atol=1e-4)
        one, one_state = model.step(tokens[row:row + 1], fed[row][1])
        assert torch.allclose(logits[row], one[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(state[0][1][row], one_state[0][1][0], rtol=1e-5, atol=1e-5)  # sums of 1024 in another order


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 63, 64, 65, 127, 128, 199])
def test_is_finite_finds_one_bad_bf16_value_at_any_position_and_chunk_edge(monkeypatch, bad, where):
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 64)  # 200 elements: chunks [0,64) [64,128) ... [192,200)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, generator=g).bfloat16()
    assert checkpoint.is_finite(t) and checkpoint.is_finite(t.view(8, 25))
    t[where] = bad
    assert not checkpoint.is_finite(t) and not checkpoint.is_finite(t.view(8, 25))
    assert bool(torch.isfinite(t).all()) is False  # the obvious reference agrees


def test_is_finite_passes_finite_bf16_values_whose_bf16_sum_overflows(monkeypatch):
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 64)
    big = torch.full((200,), 3.0e38).bfloat16()  # finite (bf16 max ~3.39e38); any chunk sum overflows
    assert torch.isfinite(big).all() and not torch.isfinite(big[:64].sum())
    assert checkpoint.is_finite(big)
    big[150] = float("inf")
    assert not checkpoint.is_finite(big)


def test_is_finite_leaves_the_thread_count_as_it_found_it():
    n = torch.get_num_threads()
    t = torch.zeros(1 << 17, dtype=torch.bfloat16)
    assert checkpoint.is_finite(t)
    t[-1] = float("nan")
    assert not checkpoint.is_finite(t)
    assert torch.get_num_threads() == n

"""WKV6 fast CPU path (chunked form, hand-written backward) against the per-token reference."""
from __future__ import annotations

import pytest
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.wkv import wkv6, wkv6_chunked, wkv6_reference


def make_inputs(B, T, H, N, dtype=torch.float64, state=True, w_range=(-8.0, 2.5), seed=0):
    """r, k, v ~ N(0, 1); w uniform in w_range (decay exp(-exp(w)) from ~1 down to ~5e-6)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    s = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if state else None
    return [x if x is None else x.to(dtype) for x in (r, k, v, w, u, s)]


def run_with_grads(fn, inputs, seed=1):
    """Forward, then backward of a random projection of (y, final state); returns outputs+grads."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    ((y * gy).sum() + (s * gs).sum()).backward()
    return [y, s] + [x.grad for x in leaves if x is not None]


NAMES = ["y", "state", "gr", "gk", "gv", "gw", "gu", "gstate"]


def assert_close_all(got, want, tol, names=NAMES):
    for name, a, b in zip(names, got, want):
        scale = max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).abs().max().item() / scale
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("T", [1, 7, 33, 69, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_values_and_all_grads_float64(T, with_state):
    inputs = make_inputs(2, T, 2, 8, state=with_state, seed=T)
    assert_close_all(run_with_grads(wkv6, inputs), run_with_grads(wkv6_reference, inputs), 1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = make_inputs(1, 50, 2, 8, seed=5)
    want = run_with_grads(wkv6_reference, inputs)
    got = run_with_grads(lambda *a: wkv6_chunked(*a, chunk=chunk), inputs)
    assert_close_all(got, want, 1e-10)


@pytest.mark.parametrize("strong_limit", [0.5, 5.0, 40.0])
def test_factored_and_explicit_channel_paths_both_match_reference(strong_limit):
    # Channels whose decay over a chunk is below exp(-strong_limit) take the explicit pairwise
    # path, the others the factored matmul; small limits push most channels to the first.
    inputs = make_inputs(2, 69, 2, 8, w_range=(-3.0, 2.5), seed=10)
    want = run_with_grads(wkv6_reference, inputs)
    got = run_with_grads(lambda *a: wkv6_chunked(*a, chunk=16, strong_limit=strong_limit), inputs)
    assert_close_all(got, want, 1e-10)


def test_chunked_backward_passes_gradcheck():
    r, k, v, w, u, s = make_inputs(1, 6, 1, 3, seed=2)
    leaves = [x.requires_grad_() for x in (r, k, v, w, u, s)]
    assert torch.autograd.gradcheck(lambda *a: wkv6_chunked(*a, chunk=4), leaves)


def test_float32_matches_float64_reference():
    inputs = make_inputs(2, 100, 2, 16, seed=3)
    want = run_with_grads(wkv6_reference, inputs)
    got = run_with_grads(wkv6, [x.float() for x in inputs])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close_all(got, want, 2e-5)


def test_bfloat16_inputs_return_bfloat16_output_and_float32_state():
    inputs = [x.to(torch.bfloat16) for x in make_inputs(1, 20, 2, 8, state=False, seed=4)[:5]]
    got = run_with_grads(wkv6, inputs + [None])
    assert got[0].dtype == torch.bfloat16
    assert got[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2:])
    want = run_with_grads(wkv6_reference, [x.double() for x in inputs] + [None])
    assert_close_all(got, want, 3e-2)  # bf16 rounding of y and of the gradients


def test_enclosing_bf16_autocast_does_not_change_the_float32_result():
    inputs = [x.float() for x in make_inputs(1, 37, 2, 8, seed=5)]
    want = run_with_grads(wkv6, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_with_grads(wkv6, inputs)
    assert got[0].dtype == torch.float32
    assert_close_all(got, want, 1e-6)


def test_non_contiguous_inputs_give_the_same_result():
    inputs = make_inputs(2, 21, 3, 8, seed=11)
    want = run_with_grads(wkv6_reference, inputs)
    # The same values seen through a (B, H, T, N) -> (B, T, H, N) transpose: not contiguous.
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:4]] + inputs[4:]
    assert not strided[0].is_contiguous()
    assert_close_all(run_with_grads(wkv6, strided), want, 1e-10)


def test_zero_length_sequence_returns_the_initial_state():
    r, k, v, w, u, s = make_inputs(2, 0, 2, 4, seed=6)
    y, state = wkv6(r, k, v, w, u, s)
    assert y.shape == (2, 0, 2, 4)
    assert torch.equal(state, s)


def test_extreme_decays_stay_finite_and_match_reference():
    # decay exactly 1 (w = -30) next to decay exactly 0 (w = 6, exp(-403) underflows in float32).
    r, k, v, w, u, s = make_inputs(1, 40, 2, 8, seed=7)
    coin = torch.rand(w.shape, generator=torch.Generator().manual_seed(8)) < 0.5
    w = torch.where(coin, -30.0, 6.0).double()
    want = run_with_grads(wkv6_reference, [r, k, v, w, u, s])
    assert_close_all(run_with_grads(wkv6, [r, k, v, w, u, s]), want, 1e-10)
    got32 = run_with_grads(wkv6, [x.float() for x in (r, k, v, w, u, s)])
    assert all(torch.isfinite(g).all() for g in got32)
    # gw = dL/dlog(decay) * log(decay): float32 rounding in dL/dlog(decay) is multiplied by
    # |log(decay)| = exp(6) ~ 400 here, so gw gets a looser bound than everything else.
    others = [i for i, name in enumerate(NAMES) if name != "gw"]
    assert_close_all(*([x[i] for i in others] for x in (got32, want)), 1e-4,
                     names=[NAMES[i] for i in others])
    gw_at = NAMES.index("gw")
    assert_close_all([got32[gw_at]], [want[gw_at]], 5e-3, names=["gw"])


def test_long_sequence_float32_is_stable_and_close_to_float64():
    # Weak decays keep memory over all 2048 steps; strong ones test underflow.
    inputs = make_inputs(1, 2048, 1, 16, w_range=(-9.0, 2.5), seed=9)
    want = run_with_grads(wkv6_reference, inputs)
    got = run_with_grads(wkv6, [x.float() for x in inputs])
    assert all(torch.isfinite(g).all() for g in got)
    assert_close_all(got, want, 1e-4)


@pytest.mark.parametrize(
    "bad, exc, message",
    [
        ({"k": torch.zeros(2, 5, 3, 4)}, ValueError,
         r"wkv6: k has shape \(2, 5, 3, 4\), expected \(B, T, H, N\) = \(2, 6, 3, 4\) like r"),
        ({"r": torch.zeros(6, 3, 4)}, ValueError, r"wkv6: r has shape \(6, 3, 4\), expected 4"),
        ({"u": torch.zeros(3, 5)}, ValueError,
         r"wkv6: u has shape \(3, 5\), expected \(H, N\) = \(3, 4\)"),
        ({"state": torch.zeros(2, 3, 4)}, ValueError,
         r"wkv6: state has shape \(2, 3, 4\), expected \(B, H, N, N\) = \(2, 3, 4, 4\)"),
        ({"v": torch.zeros(2, 6, 3, 4, dtype=torch.float64)}, TypeError,
         r"wkv6: v has dtype torch.float64 but r has torch.float32; r, k and v must share"),
        ({"w": torch.zeros(2, 6, 3, 4, dtype=torch.long)}, TypeError,
         r"wkv6: w has dtype torch.int64, expected a floating-point dtype"),
        ({"u": [[0.0] * 4] * 3}, TypeError, r"wkv6: u must be a torch.Tensor, got list"),
        ({"u": torch.zeros(3, 4, device="meta")}, ValueError,
         r"wkv6: u is on meta but r is on cpu; put all inputs on one device"),
    ],
)
def test_bad_arguments_raise_one_clear_sentence(bad, exc, message):
    args = {
        "r": torch.zeros(2, 6, 3, 4), "k": torch.zeros(2, 6, 3, 4), "v": torch.zeros(2, 6, 3, 4),
        "w": torch.zeros(2, 6, 3, 4), "u": torch.zeros(3, 4), "state": None,
    }
    args.update(bad)
    with pytest.raises(exc, match=message) as info:
        wkv6(**args)
    assert isinstance(info.value, UserError)

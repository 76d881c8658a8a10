"""The CUDA kernel's first-use self-check, decided on CPU with injected kernels."""
from __future__ import annotations

import warnings

import pytest
import torch

import rwkv_bone.wkv as wkv
from rwkv_bone.wkv import selfcheck, wkv6, wkv6_chunked, wkv6_reference

from test_wkv import make_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.forget()
    yield
    selfcheck.forget()


def good_kernel(r, k, v, w, u, s=None):
    """A correct token-by-token op (as the kernel is): the reference in float32."""
    return wkv6_reference(r.float(), k.float(), v.float(), w.float(), u.float(), s)


def wrong_w_gradient(r, k, v, w, u, s=None):
    """Right values, no gradient for the decay: only the backward check can catch it."""
    return good_kernel(r, k, v, w.detach(), u, s)


def wrong_bonus(r, k, v, w, u, s=None):
    return good_kernel(r, k, v, w, 1.2 * u, s)


def crashing(*args):
    raise RuntimeError("no kernel image is available for execution on the device")


def test_a_correct_kernel_is_trusted_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.kernel_trusted(good_kernel, CPU, torch.float32, 64)
    errors = selfcheck.compare(good_kernel, CPU, torch.float32, 64)
    assert max(errors.values()) < 1e-4 and set(errors) == set(selfcheck.NAMES)


@pytest.mark.parametrize("kernel, culprit", [(wrong_w_gradient, "gw"), (wrong_bonus, "y"), (crashing, "no kernel")])
def test_a_wrong_kernel_is_refused_once_loudly_with_the_figures(kernel, culprit):
    with pytest.warns(RuntimeWarning, match="FAILED its self-check") as rec:
        assert not selfcheck.kernel_trusted(kernel, CPU, torch.float32, 64)
    assert culprit in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided: no second check, no second warning
        assert not selfcheck.kernel_trusted(kernel, CPU, torch.float32, 64)
    # Another dtype is checked on its own.
    with pytest.warns(RuntimeWarning):
        assert not selfcheck.kernel_trusted(kernel, CPU, torch.bfloat16, 64)


def test_wkv6_falls_back_to_chunked_when_the_kernel_fails(monkeypatch):
    calls = []

    def wrong(*args):
        calls.append(1)
        return wrong_bonus(*args)

    monkeypatch.setattr(wkv, "_kernel_applies", lambda *a: True)
    monkeypatch.setattr(wkv, "wkv6_cuda", wrong)
    r, k, v, w, u, s = make_inputs(1, 40, 1, 64, dtype=torch.float32, seed=2)
    with pytest.warns(RuntimeWarning, match="FAILED"):
        y, state = wkv6(r, k, v, w, u, s)
    n = len(calls)
    y2, _ = wkv6(r, k, v, w, u, s, doc_start=torch.zeros(1, 40, dtype=torch.bool))
    want, _ = wkv6_chunked(r, k, v, w, u, s)
    assert torch.equal(y, want) and torch.equal(y2, want)
    assert len(calls) == n  # after the verdict the wrong kernel never runs again


def test_wkv6_uses_a_kernel_that_passes(monkeypatch):
    calls = []

    def good(*args):
        calls.append(1)
        return good_kernel(*args)

    monkeypatch.setattr(wkv, "_kernel_applies", lambda *a: True)
    monkeypatch.setattr(wkv, "wkv6_cuda", good)
    r, k, v, w, u, s = make_inputs(1, 10, 1, 64, dtype=torch.float32, seed=3)
    n_check = None
    y, _ = wkv6(r, k, v, w, u, s)
    n_check = len(calls)
    wkv6(r, k, v, w, u, s)
    assert len(calls) == n_check + 1  # the check ran once, then the kernel serves every call
    torch.testing.assert_close(y, wkv6_chunked(r, k, v, w, u, s)[0], rtol=1e-5, atol=1e-5)


def off_by(fraction: float):
    """The correct op with one element of y moved by `fraction` of the float32 tolerance (relative
    to max(1, max |y|), the measure the self-check uses); gradients untouched."""
    def kernel(r, k, v, w, u, s=None):
        y, state = good_kernel(r, k, v, w, u, s)
        bump = torch.zeros_like(y)
        bump[0, 0, 0, 0] = fraction * 2e-3 * max(1.0, y.detach().abs().max().item())
        return y + bump, state
    return kernel


@pytest.mark.parametrize("fraction, trusted", [(0.9, True), (1.1, False)])
def test_the_tolerance_edge_decides_trust(fraction, trusted):
    assert selfcheck.TOLERANCE[torch.float32] == 2e-3
    kernel = off_by(fraction)
    errors = selfcheck.compare(kernel, CPU, torch.float32, 64)
    assert errors["y"] == pytest.approx(fraction * 2e-3, rel=1e-3)  # the error is what was injected
    assert max(v for k, v in errors.items() if k != "y") < 1e-4
    if trusted:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert selfcheck.kernel_trusted(kernel, CPU, torch.float32, 64)
    else:
        with pytest.warns(RuntimeWarning, match=r"FAILED its self-check .* y 2\.2e-03.*tolerance 2e-03"):
            assert not selfcheck.kernel_trusted(kernel, CPU, torch.float32, 64)

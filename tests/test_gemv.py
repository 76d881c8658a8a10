"""The few-row CPU decode kernel (rwkv_bone/gemv) against a float64 product, inside RWKV6.step,
and its fallbacks: a CPU or build where it cannot run, and a kernel that disagrees with float64."""
import pytest
import torch

from rwkv_bone import gemv, native

needs_kernel = pytest.mark.skipif(not gemv.available(), reason="the CPU decode kernel needs AVX-512 BF16 and a C compiler")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("n_out", [1, 5, 96, 131])
def test_kernel_matches_a_float64_product_at_ragged_sizes(dtype, rows, n_out):
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    w = torch.randn(n_out, 160, generator=g).to(dtype)  # K = 5 * 32; rows of W not a multiple of 3 or 4
    x = torch.randn(rows, 160, generator=g).to(dtype)
    ref = x.double() @ w.double().T
    y = gemv.linear(x, w)
    assert y.dtype == dtype and y.shape == (rows, n_out)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the result's own rounding
    assert float((y.double() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))
    torch_y = torch.nn.functional.linear(x, w)  # torch's own bf16 matmul rounds the same sums
    assert torch.allclose(y.double(), torch_y.double(), rtol=2 * tol, atol=2 * tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gives_the_same_bits_on_one_and_two_threads_and_for_each_row_alone(dtype):
    # every output sums K in the same order whatever the block shape, so batching changes no bit
    g = torch.Generator().manual_seed(0)
    w = torch.randn(301, 256, generator=g).to(dtype)
    x = torch.randn(11, 256, generator=g).to(dtype)
    lib = gemv._library()
    both = gemv._run(lib, x, w, 2)
    assert torch.equal(both, gemv._run(lib, x, w, 1))
    for row in range(11):
        assert torch.equal(both[row:row + 1], gemv._run(lib, x[row:row + 1].contiguous(), w, 2))


def test_applies_only_to_contiguous_same_dtype_cpu_inputs_without_autograd(monkeypatch):
    monkeypatch.setattr(gemv, "available", lambda: True)
    w, x = torch.randn(64, 64), torch.randn(4, 64)
    assert gemv.applies(x, w)
    assert not gemv.applies(x.bfloat16(), w)  # mixed dtypes
    assert not gemv.applies(x.double(), w.double())  # float64 stays on torch (the reference)
    assert not gemv.applies(torch.randn(4, 48), torch.randn(64, 48))  # K not a multiple of 32
    assert not gemv.applies(torch.randn(gemv.MAX_ROWS + 1, 64), w)
    assert not gemv.applies(x, torch.randn(64, 64).T)  # a transposed view
    assert not gemv.applies(x, w.requires_grad_())  # autograd needs torch's op
    with torch.no_grad():
        assert gemv.applies(x, w)
    previous = gemv.set_enabled(False)
    try:
        assert not gemv.applies(x, w.detach())
    finally:
        gemv.set_enabled(previous)
    assert gemv.try_linear(torch.randn(4, 48), torch.randn(64, 48)) is None
    with pytest.raises(ValueError, match="does not apply"):
        gemv.linear(torch.randn(4, 48), torch.randn(64, 48))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_step_with_the_kernel_equals_the_step_without_it(dtype, monkeypatch):
    from conftest import random_model

    from rwkv_bone.decode import cat_states, feed

    model = random_model(seed=3, dtype=dtype).eval()
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11, 12]]
    state = cat_states([feed(model, p)[1] for p in prompts])
    tokens = torch.tensor([13, 14, 15, 16, 17])
    monkeypatch.setattr(gemv, "_enabled", False)
    ref, ref_state = model.step(tokens, state)
    monkeypatch.setattr(gemv, "_enabled", True)
    calls = []
    real = gemv._run
    monkeypatch.setattr(gemv, "_run", lambda *a: calls.append(1) or real(*a))
    out, out_state = model.step(tokens, state)
    assert calls, "the step did not use the kernel"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out, ref, rtol=tol, atol=tol)
    for a, b in zip(out_state, ref_state):
        for s, t in zip(a, b):
            assert torch.allclose(s.float(), t.float(), rtol=tol, atol=tol)


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gemv._library.cache_clear()
    gemv.available.cache_clear()


def test_a_failing_compiler_warns_once_and_falls_back_to_torch(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "false")  # exits 1 for any arguments
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")
    try:
        with pytest.warns(RuntimeWarning, match="CPU decode kernel is not available"):
            assert gemv.available() is False
        assert not gemv.applies(torch.randn(2, 64), torch.randn(8, 64))
        assert list(tmp_path.rglob("*.so")) == [] and list(tmp_path.rglob(".gemv-*")) == []  # no half-built file
    finally:
        gemv._library.cache_clear()
        gemv.available.cache_clear()


@needs_kernel
def test_a_kernel_that_disagrees_with_float64_is_turned_off(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    real = gemv._run
    monkeypatch.setattr(gemv, "_run", lambda lib, x, w, t: real(lib, x, w, t) * (1 + 1e-3))
    try:
        with pytest.warns(RuntimeWarning, match="disagrees with float64"):
            assert gemv.available() is False
    finally:
        gemv._library.cache_clear()
        gemv.available.cache_clear()


@needs_kernel
def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    try:
        first = gemv.build()
        assert first.parent == tmp_path / "rwkv_bone" and first.is_file()
        mtime = first.stat().st_mtime_ns
        assert gemv.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
        monkeypatch.setattr(gemv, "CFLAGS", gemv.CFLAGS + ("-DRB_TEST_FLAG",))
        assert gemv.build() != first  # other flags, another file
    finally:
        gemv._library.cache_clear()
        gemv.available.cache_clear()


@needs_kernel
@pytest.mark.parametrize("B,H,N", [(1, 1, 1), (1, 2, 64), (5, 3, 24), (8, 32, 64)])
def test_wkv_step_kernel_matches_float64_and_leaves_the_state_it_read(B, H, N, monkeypatch):
    g = torch.Generator().manual_seed(B * 100 + N)
    S, r, k, v = (torch.randn(*s, generator=g) for s in ((B, H, N, N), (B, H, N), (B, H, N), (B, H, N)))
    d, u = torch.rand(B, H, N, generator=g), torch.randn(H, N, generator=g)
    before = S.clone()
    assert gemv.available()  # its self-check runs the kernel too: before the count starts
    calls = []
    real = gemv._run_wkv_step
    monkeypatch.setattr(gemv, "_run_wkv_step", lambda *a: calls.append(1) or real(*a))
    y, S2 = gemv.wkv_step(S, r, k, v, d, u)
    assert calls and torch.equal(S, before)
    want_y, want_S = gemv.wkv_step_reference(*(t.double() for t in (S, r, k, v, d, u)))
    for got, want in ((y, want_y), (S2, want_S)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got.double() - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    # float64 (the reference model) and autograd stay on torch's ops
    assert torch.equal(gemv.wkv_step(*(t.double() for t in (S, r, k, v, d, u)))[1], want_S) and len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 20])
@pytest.mark.parametrize("n_in,n_out", [(1, 16), (32, 160), (64, 2048 + 16), (160, 48)])
def test_k_by_n_kernel_matches_float64_and_declines_what_it_cannot_take(rows, n_in, n_out):
    g = torch.Generator().manual_seed(rows + n_out)
    w, x = torch.randn(n_in, n_out, generator=g), torch.randn(rows, n_in, generator=g)
    y = gemv.try_matmul(x, w)
    ref = x.double() @ w.double()
    assert y is not None and y.shape == (rows, n_out)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.equal(gemv.try_matmul(x[:, :].t().contiguous().t(), w), y)  # a strided x is copied first
    assert gemv.try_matmul(x, torch.randn(n_in, 24)) is None           # N not a multiple of 16
    assert n_in == 1 or gemv.try_matmul(x, torch.randn(n_in, n_out + 16)[:, :n_out]) is None  # w strided
    assert gemv.try_matmul(x.double(), w.double()) is None
    assert gemv.try_matmul(x.requires_grad_(), w) is None

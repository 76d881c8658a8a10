"""float32 weights packed in panels for decoding (rwkv_bone/gemv/packed.py, gemv.c's packed kernel):
the layout round trip, the kernel and the torch fallback against a float64 product at ragged sizes,
the self-check that turns a wrong kernel off, and load_model's packed model against the plain one."""
import pytest
import torch

from rwkv_bone import gemv
from rwkv_bone.gemv.packed import PackedLinear, pack_linears, packable

needs_kernel = pytest.mark.skipif(not gemv.available(), reason="the CPU decode kernel needs AVX-512 BF16 and a C compiler")
SHAPES = [(16, 1), (48, 7), (80, 37), (96, 160), (2048 + 32, 64)]  # a part panel; one; one and a part; ...


def reference_packing(w: torch.Tensor) -> torch.Tensor:
    """The layout spelled out element by element: panel p = rows 48p.., each a (K, h) block."""
    N, K = w.shape
    out = []
    for o in range(0, N, gemv.PANEL):
        rows = w[o:o + gemv.PANEL]
        out += [rows[j, k] for k in range(K) for j in range(rows.shape[0])]
    return torch.stack(out)


@pytest.mark.parametrize("n_out,n_in", [(16, 3), (48, 2), (64, 5), (112, 4)])
def test_pack_lays_out_panels_and_unpack_gives_the_same_bits_back(n_out, n_in):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(n_out))
    packed = gemv.pack(w)
    assert torch.equal(packed, reference_packing(w))
    assert torch.equal(gemv.unpack(packed, n_out, n_in), w)


def test_pack_refuses_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv.pack(torch.randn(40, 8))
    with pytest.raises(ValueError, match="float32"):
        gemv.pack(torch.randn(32, 8).bfloat16())
    assert not packable(torch.nn.Linear(8, 40, bias=False))
    assert not packable(torch.nn.Linear(8, 32, bias=True))
    assert packable(torch.nn.Linear(8, 32, bias=False))


@needs_kernel
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 19, 64, 200])
def test_packed_linear_matches_a_float64_product(n_out, n_in, rows):
    g = torch.Generator().manual_seed(rows * 7 + n_out)
    lin = torch.nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    x = torch.randn(rows, n_in, generator=g)
    ref = x.double() @ lin.weight.double().T
    packed = PackedLinear.from_linear(lin)
    y = packed(x)
    assert y.dtype == torch.float32 and y.shape == (rows, n_out)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.allclose(y, lin(x), rtol=1e-5, atol=1e-5)
    # a batch changes no bit of a row (each output sums K in the same order), threads neither
    assert torch.equal(y[-1:], packed(x[-1:].contiguous()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(y, packed(x))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_kernel_runs_for_any_rows_and_torch_without_it_or_under_autograd(monkeypatch):
    calls = []
    real = gemv._run_packed
    monkeypatch.setattr(gemv, "_run_packed", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    lin = torch.nn.Linear(64, 96, bias=False).requires_grad_(False)
    packed = PackedLinear.from_linear(lin)
    x = torch.randn(2, 5, 64)  # leading dims flatten into rows
    y = packed(x)
    assert calls == [10] and y.shape == (2, 5, 96) and torch.allclose(y, lin(x), rtol=1e-5, atol=1e-5)
    big = torch.randn(300, 64)
    assert torch.allclose(packed(big), lin(big), rtol=1e-5, atol=1e-5) and calls == [10, 300]
    monkeypatch.setattr(gemv, "_enabled", False)
    assert torch.allclose(packed(x), lin(x), rtol=1e-5, atol=1e-5) and calls == [10, 300]
    monkeypatch.setattr(gemv, "_enabled", True)
    xg = torch.randn(3, 64, requires_grad=True)  # autograd: torch's op, gradient through the panels
    packed(xg).sum().backward()
    assert calls == [10, 300] and torch.allclose(xg.grad, lin.weight.sum(0).expand(3, 64), rtol=1e-5, atol=1e-5)


def test_pack_in_place_gives_the_packed_copy_in_the_weight_s_own_storage():
    w = torch.randn(112, 37, generator=torch.Generator().manual_seed(1))
    want = gemv.pack(w)
    got = gemv.pack_(w)
    assert got.data_ptr() == w.data_ptr() and torch.equal(got, want)
    with pytest.raises(ValueError, match="contiguous"):
        gemv.pack_(torch.randn(37, 112).t())


@needs_kernel
def test_a_packed_kernel_that_disagrees_with_float64_is_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gemv._library.cache_clear()
    gemv.available.cache_clear()
    real = gemv._run_packed
    # wrong only where a panel is partial (N = 80: rows 48..79), as a layout slip would be
    monkeypatch.setattr(gemv, "_run_packed", lambda lib, x, p, n, t: real(lib, x, p, n, t).index_fill_(
        1, torch.tensor([n - 1]), 0.0) if n % gemv.PANEL else real(lib, x, p, n, t))
    try:
        with pytest.warns(RuntimeWarning, match="float32 packed"):
            assert gemv.available() is False
        assert pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 32, bias=False))) == 0
    finally:
        gemv._library.cache_clear()
        gemv.available.cache_clear()


@needs_kernel
def test_load_model_packs_fp32_and_decodes_what_the_plain_model_decodes(tmp_path):
    from conftest import random_model

    from rwkv_bone.decode import greedy_batch
    from rwkv_bone.loading import load_model

    path = str(tmp_path / "m.pth")
    random_model(seed=2, vocab_size=304).save_checkpoint(path)  # V = 19 * 16: a part panel in the head
    packed, plain = load_model(path), load_model(path, pack=False)
    kinds = {type(m).__name__ for m in packed.modules()}
    assert "PackedLinear" in kinds and type(packed.head) is PackedLinear
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert not any(isinstance(m, PackedLinear) for m in load_model(path, dtype=torch.bfloat16).modules())
    # the state dict is the plain model's, bit for bit, so saving a packed model changes nothing
    a, b = packed.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(1, 304, (2, 9))
    with torch.no_grad():
        assert torch.allclose(packed(x), plain(x), rtol=1e-4, atol=1e-4)
    prompts = [[5, 9, 2], [3], [8, 1, 1, 4, 6], [7, 7], [2, 4], [9], [1, 2, 3, 4], [6, 5], [3, 3]]
    assert greedy_batch(packed, prompts, 8, batch_size=8) == greedy_batch(plain, prompts, 8, batch_size=8)


def test_the_kernels_are_on_where_the_cpu_can_run_them():
    # A kernel that fails its self-check turns itself off and every test above skips; on a CPU with
    # AVX-512 BF16 and a compiler that must not pass unnoticed.
    from rwkv_bone import native

    try:
        cpu = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    if "avx512_bf16" not in cpu.split() or not native.compiler():
        pytest.skip("this CPU or machine cannot run the kernels")
    assert gemv.available()

"""float32 and bfloat16 weights packed in panels for decoding (rwkv_bone/gemv/packed.py, gemv.c's packed kernel):
the layout round trip, the kernel and the torch fallback against a float64 product at ragged sizes,
the self-check that turns a wrong kernel off, and load_model's packed model against the plain one."""
import pytest
import torch

from rwkv_bone import gemv
from rwkv_bone.gemv.packed import PackedLinear, pack_linears, packable

needs_kernel = pytest.mark.skipif(not gemv.available(), reason="the CPU decode kernel needs AVX-512 BF16 and a C compiler")
SHAPES = [(16, 1), (48, 7), (80, 37), (96, 160), (2048 + 32, 64)]  # a part panel; one; one and a part; ...


def reference_packing(w: torch.Tensor) -> torch.Tensor:
    """The layout spelled out element by element: panel p = rows 48p.., each a (K, h) block of
    words, a bfloat16 word being the pair (W[j, 2i], W[j, 2i + 1])."""
    N, K = w.shape
    g = 2 if w.dtype == torch.bfloat16 else 1
    out = []
    for o in range(0, N, gemv.PANEL):
        rows = w[o:o + gemv.PANEL]
        out += [rows[j, g * i + e] for i in range(K // g) for j in range(rows.shape[0]) for e in range(g)]
    return torch.stack(out)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out,n_in", [(16, 4), (48, 2), (64, 6), (112, 10)])
def test_pack_lays_out_panels_and_unpack_gives_the_same_bits_back(n_out, n_in, dtype):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(n_out)).to(dtype)
    w[0, 1] = float("nan")  # bits, not values, are moved
    want = reference_packing(w)
    assert same_bits(gemv.pack(w), want)
    assert same_bits(gemv._pack_words(w.view(torch.int32)).view(dtype), want)  # torch's path, no kernel
    assert same_bits(gemv.unpack(gemv.pack(w), n_out, n_in), w)


@pytest.mark.parametrize("n_out,n_in", [(16, 3), (80, 5)])
def test_pack_takes_an_odd_k_in_float32(n_out, n_in):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gemv.pack(w), reference_packing(w))
    assert torch.equal(gemv.unpack(gemv.pack(w), n_out, n_in), w)


def test_pack_refuses_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv.pack(torch.randn(40, 8))
    with pytest.raises(ValueError, match="K even"):
        gemv.pack(torch.randn(32, 7).bfloat16())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gemv.pack(torch.randn(32, 8).half())
    assert not packable(torch.nn.Linear(8, 40, bias=False))
    assert not packable(torch.nn.Linear(8, 32, bias=True))
    assert not packable(torch.nn.Linear(7, 32, bias=False).bfloat16())
    assert not packable(torch.nn.Linear(8, 32, bias=False).half())
    assert packable(torch.nn.Linear(8, 32, bias=False))
    assert packable(torch.nn.Linear(7, 32, bias=False))
    assert packable(torch.nn.Linear(8, 32, bias=False).bfloat16())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 19, 64, 200])
def test_packed_linear_matches_a_float64_product(n_out, n_in, rows, dtype):
    g = torch.Generator().manual_seed(rows * 7 + n_out)
    n_in += n_in % 2 if dtype == torch.bfloat16 else 0
    lin = torch.nn.Linear(n_in, n_out, bias=False).requires_grad_(False).to(dtype)
    lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    ref = x.double() @ lin.weight.double().T  # bf16 inputs: their products are exact in float32
    packed = PackedLinear.from_linear(lin)
    y = packed(x)
    assert y.dtype == dtype and y.shape == (rows, n_out)
    # float32 sums: 1e-5 of the largest output; bf16: the float32 sum is rounded to bf16 at the end
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert float((y.double() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))
    assert torch.allclose(y.float(), lin(x).float(), rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
    # a batch changes no bit of a row (each output sums K in the same order), threads neither
    assert torch.equal(y[-1:], packed(x[-1:].contiguous()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(y, packed(x))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_kernel_runs_for_any_rows_and_torch_without_it_or_under_autograd(monkeypatch, dtype, tol):
    calls = []
    real = gemv._run_packed
    monkeypatch.setattr(gemv, "_run_packed", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    lin = torch.nn.Linear(64, 112, bias=False).requires_grad_(False).to(dtype)  # two panels and a part
    packed = PackedLinear.from_linear(lin)
    x = torch.randn(2, 5, 64).to(dtype)  # leading dims flatten into rows

    def close(a, b):
        return a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)

    y = packed(x)
    assert calls == [10] and y.shape == (2, 5, 112) and close(y, lin(x))
    big = torch.randn(300, 64).to(dtype)
    assert close(packed(big), lin(big)) and calls == [10, 300]
    monkeypatch.setattr(gemv, "_enabled", False)  # torch over the panels: the same product
    assert close(packed(x), lin(x)) and calls == [10, 300]
    monkeypatch.setattr(gemv, "_enabled", True)
    xg = torch.randn(3, 64, requires_grad=True)  # autograd: torch's op, gradient through the panels
    packed(xg.to(dtype)).float().sum().backward()
    assert calls == [10, 300] and torch.allclose(xg.grad, lin.weight.float().sum(0).expand(3, 64), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,n_in", [(torch.float32, 37), (torch.bfloat16, 38)])
def test_pack_in_place_gives_the_packed_copy_in_the_weight_s_own_storage(dtype, n_in):
    w = torch.randn(112, n_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = gemv.pack(w)
    got = gemv.pack_(w)
    assert got.data_ptr() == w.data_ptr() and same_bits(got, want)
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
    # a bf16 file (as releases are) run in fp32: the converted weights are packed in place, by default
    random_model(seed=2, vocab_size=304).bfloat16().save_checkpoint(path)  # V = 19 * 16: a part panel
    packed, plain = load_model(path), load_model(path, pack=False)
    kinds = {type(m).__name__ for m in packed.modules()}
    assert "PackedLinear" in kinds and type(packed.head) is PackedLinear
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    # the state dict is the plain model's, bit for bit, so saving a packed model changes nothing
    a, b = packed.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(1, 304, (2, 9))
    with torch.no_grad():
        assert torch.allclose(packed(x), plain(x), rtol=1e-4, atol=1e-4)
    prompts = [[5, 9, 2], [3], [8, 1, 1, 4, 6], [7, 7], [2, 4], [9], [1, 2, 3, 4], [6, 5], [3, 3]]
    assert greedy_batch(packed, prompts, 8, batch_size=8) == greedy_batch(plain, prompts, 8, batch_size=8)
    # an fp32 file run in fp32 stays mapped: packed only on request, then into new memory
    path32 = str(tmp_path / "m32.pth")
    random_model(seed=2, vocab_size=304).save_checkpoint(path32)
    assert not any(isinstance(m, PackedLinear) for m in load_model(path32).modules())
    assert type(load_model(path32, pack=True).head) is PackedLinear


@needs_kernel
def test_load_model_packs_bf16_on_request_without_changing_the_mapped_file(tmp_path):
    from conftest import random_model

    from rwkv_bone.loading import load_model

    path = tmp_path / "m.pth"
    random_model(seed=3, vocab_size=304).to(torch.bfloat16).save_checkpoint(str(path))
    before = path.read_bytes()
    # by default a model whose weights are still the mapped file is not packed (it would cost a copy)
    plain = load_model(str(path), dtype=torch.bfloat16)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    packed = load_model(str(path), dtype=torch.bfloat16, pack=True)
    assert type(packed.head) is PackedLinear and packed.head.packed.dtype == torch.bfloat16
    assert path.read_bytes() == before  # packed into new memory: the file is as it was
    # and the model that was not packed still reads the mapped weights, untouched
    assert torch.equal(plain.head.weight, torch.load(str(path))["head.weight"])
    a, b = packed.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    x = torch.randint(1, 304, (2, 9))
    with torch.no_grad():
        # each output sums the same bf16 products in float32, in another order: rounding apart
        got, want = packed(x).float(), plain(x).float()
        assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


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


def test_eval_packs_every_weight_at_every_batch_size(monkeypatch):
    # eval asks for every weight packed (bf16 mapped ones too: a copy its steps pay back), at batch 1
    # as well, so that a completion sums in the same order whatever --batch_size is
    import rwkv_bone.loading as loading
    from rwkv_bone.eval.evaluate import EvalOptions, load_for_eval

    seen = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: seen.append(k.get("pack")))
    for batch in (8, 1):
        load_for_eval(EvalOptions(model="m.pth", data="d.jsonl", task="gsm8k", batch_size=batch))
    assert seen == [True, True]


@needs_kernel
def test_a_packed_bf16_row_decodes_the_same_alone_or_in_a_batch(tmp_path):
    from conftest import random_model

    from rwkv_bone.decode import greedy_batch
    from rwkv_bone.loading import load_model

    path = str(tmp_path / "m.pth")
    random_model(seed=4, vocab_size=304).bfloat16().save_checkpoint(path)
    model = load_model(path, dtype=torch.bfloat16, pack=True)
    prompts = [[5, 9, 2], [3], [8, 1, 1, 4, 6], [7, 7], [2, 4], [9], [1, 2, 3, 4], [6, 5], [3, 3]]
    batched = greedy_batch(model, prompts, 12, batch_size=8)
    assert batched == [greedy_batch(model, [p], 12, batch_size=1)[0] for p in prompts]

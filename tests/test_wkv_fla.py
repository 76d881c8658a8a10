"""The fla backend (rwkv_bone/wkv/fla.py): fla's own Triton kernels, run on the CPU by the Triton
interpreter, against the float64 reference: values and every gradient (r, k, v, w, u, initial
state, through y and the final state), lengths that do not divide fla's chunks, initial / final
state, packed rows via cu_seqlens, and the public op's backend choice with its self-check.

The kernels run in a child process (`python tests/test_wkv_fla.py`) with TRITON_INTERPRET=1 set
before triton is imported and triton.autotune cut to its first config (the interpreter has no
benchmarker for the autotuner), so this test process never imports fla or triton. Skipped when
flash-linear-attention / triton are not installed (the default install; `pip install .[fla]`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAVE_FLA = all(importlib.util.find_spec(m) is not None for m in ("fla", "triton"))
needs_fla = pytest.mark.skipif(not HAVE_FLA, reason="flash-linear-attention / triton not installed (pip install .[fla])")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 kernels vs the float64 reference, relative to max(1, max |reference|)
NAMES = ("y", "state", "gr", "gk", "gv", "gw", "gu", "gstate")
# (name, B, T, with initial state, document starts {row: [t, ...]} or None)
CASES = [
    ("ragged_with_state", 2, 13, True, None),       # 13: not a multiple of 16 / 32 / 64
    ("zero_state_T20", 1, 20, False, None),
    ("single_token", 2, 1, True, None),
    ("packed_rows", 2, 19, True, {0: [0, 5, 6], 1: [11]}),  # row 1 continues its state up to t = 11
    ("packed_no_state", 2, 17, False, {0: [3], 1: [0, 16]}),
]


def _child() -> dict:
    """Runs in the child process: every case in both fla modes, the largest relative errors."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    autotune = triton.autotune
    triton.autotune = lambda configs, *a, **kw: autotune(configs[:1], *a, **kw)
    import warnings

    import torch

    warnings.simplefilter("ignore")
    import rwkv_bone.wkv as wkv
    from rwkv_bone.wkv import selfcheck, wkv6_fla, wkv6_reference
    from rwkv_bone.wkv.resets import wkv6_with_doc_starts

    def inputs(B, T, with_state, seed):
        g = torch.Generator().manual_seed(seed)
        H, N = 2, 8
        rkv = [torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3)]
        w = -4.0 + 5.0 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
        u = torch.randn(H, N, generator=g, dtype=torch.float64)
        s0 = 0.5 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if with_state else None
        gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
        gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
        return rkv + [w, u, s0], gy, gs

    def solve(op, xs, gy, gs, dtype):
        leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]
        y, s = op(*leaves)
        live = [x for x in leaves if x is not None]
        grads = torch.autograd.grad((y.double() * gy).sum() + (s.double() * gs).sum(), live)
        grads = iter(grads)
        out = [y, s] + [torch.zeros(1) if x is None else next(grads) for x in leaves]
        return [t.detach().double() for t in out]

    def rel(a, b):
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() if b.numel() else 0.0

    result: dict = {}
    for mode in ("recurrent", "chunk"):
        for i, (name, B, T, with_state, starts) in enumerate(CASES):
            xs, gy, gs = inputs(B, T, with_state, seed=i)
            ds = None
            if starts is not None:
                ds = torch.zeros(B, T, dtype=torch.bool)
                for row, ts in starts.items():
                    ds[row, ts] = True
            ref = (lambda *a: wkv6_reference(*a)) if ds is None else \
                (lambda *a: wkv6_with_doc_starts(wkv6_reference, *a, ds))
            got_op = lambda *a: wkv6_fla(*a, doc_start=ds, mode=mode)  # noqa: E731
            try:
                want = solve(ref, xs, gy, gs, torch.float64)
                got = solve(got_op, xs, gy, gs, torch.float32)
                with torch.no_grad():  # no read-out tokens: same values
                    y_ng, s_ng = wkv6_fla(*[None if x is None else x.float() for x in xs], doc_start=ds, mode=mode)
                errs = {n: rel(a, b) for n, a, b in zip(NAMES, got, want)}
                errs["y_no_grad"] = rel(y_ng.double(), want[0])
                errs["state_no_grad"] = rel(s_ng.double(), want[1])
                result[f"{mode}/{name}"] = errs
            except Exception as exc:
                result[f"{mode}/{name}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    # The public op: backend "fla" runs (after its self-check) and matches the chunked path.
    wkv.FLA_MODE = "recurrent"
    selfcheck.forget()
    xs, gy, gs = inputs(2, 11, True, seed=99)
    x32 = [x.float() for x in xs]
    ds = torch.zeros(2, 11, dtype=torch.bool)
    ds[1, 4] = True
    y, s = wkv.wkv6(*x32, doc_start=ds, backend="fla")
    y2, s2 = wkv.wkv6_chunked(*x32, doc_start=ds)
    result["public"] = {"y": rel(y.double(), y2.double()), "state": rel(s.double(), s2.double()),
                        "verdicts": [list(map(str, k)) + [v] for k, v in selfcheck.verdicts().items()]}
    # Why fla.py appends read-out tokens: fused_recurrent's own backward drops the final state's
    # cotangent (a loss on the final state alone gives k no gradient).
    from fla.ops.rwkv6 import fused_recurrent_rwkv6

    r, k, v, w, u, s0 = [x.float().requires_grad_() for x in xs]
    _, s = fused_recurrent_rwkv6(r, k, v, -torch.exp(w), u, scale=1.0, initial_state=s0, output_final_state=True)
    gk_raw = torch.autograd.grad((s * gs.float()).sum(), k, allow_unused=True)[0]
    _, s = wkv6_fla(r, k, v, w, u, s0, mode="recurrent")
    gk = torch.autograd.grad((s * gs.float()).sum(), k)[0]
    result["raw_final_state_grad"] = {"raw": 0.0 if gk_raw is None else gk_raw.abs().max().item(),
                                      "ours": gk.abs().max().item()}
    return result


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(errs: dict) -> None:
    assert "error" not in errs, errs
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, errs


@needs_fla
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_fused_recurrent_matches_the_reference_in_values_and_every_gradient(results, case):
    _check(results[f"recurrent/{case}"])


@needs_fla
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_chunk_matches_the_reference_in_values_and_every_gradient(results, case):
    errs = results[f"chunk/{case}"]
    if "error" in errs and "no attribute 'to'" in errs["error"]:
        pytest.skip("chunk_rwkv6 does not run under the Triton interpreter (fla's chunk_fwd_h calls "
                    f"`.to` on a loop index, a Python int there): {errs['error'][:120]}")
    _check(errs)


@needs_fla
def test_public_op_runs_the_fla_backend_after_its_self_check(results):
    pub = results["public"]
    assert pub["y"] < TOL and pub["state"] < TOL
    fla_verdicts = [v for v in pub["verdicts"] if v[0].startswith("fla")]
    assert fla_verdicts and all(v[-1] is True for v in fla_verdicts), pub["verdicts"]


@needs_fla
def test_fused_recurrent_alone_drops_the_final_state_gradient_which_the_readout_restores(results):
    got = results["raw_final_state_grad"]
    assert got["raw"] == 0.0 and got["ours"] > 0.1


def test_backend_choice_is_validated_without_importing_fla():
    import torch

    import rwkv_bone.wkv as wkv
    from rwkv_bone.errors import UserError

    imported_before = "fla" in sys.modules
    g = torch.Generator().manual_seed(0)
    r, k, v, w = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(4))
    u = torch.randn(2, 8, generator=g)
    with pytest.raises(wkv.WKVTypeError, match="backend must be one of auto, cuda, fla, chunked"):
        wkv.wkv6(r, k, v, w, u, backend="triton")
    for name in ("cuda", "fla"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(UserError, match=f"backend '{name}' needs CUDA tensors"):
                wkv.wkv6(r, k, v, w, u, backend=name)
    y, s = wkv.wkv6(r, k, v, w, u, backend="chunked")
    y2, s2 = wkv.wkv6_chunked(r, k, v, w, u)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    assert wkv.wkv6(r, k, v, w, u, backend="auto")[0].allclose(y)  # CPU: auto is the chunked path
    assert ("fla" in sys.modules) == imported_before  # nothing above imported it


def test_the_backend_is_a_model_config_field_passed_to_the_op(monkeypatch):
    import torch

    import rwkv_bone.model as model_mod
    from rwkv_bone import RWKV6, RWKV6Config
    from rwkv_bone.errors import UserError
    from rwkv_bone.wkv import wkv6_reference

    tiny = dict(n_layer=1, n_embd=64, vocab_size=50, dim_ffn=128, head_size=32, dim_maa=8, dim_decay=8)
    with pytest.raises(UserError, match="wkv_backend must be one of"):
        RWKV6Config(**tiny, wkv_backend="triton")
    seen = []

    def spy(r, k, v, w, u, state=None, doc_start=None, backend="auto"):
        seen.append(backend)
        return wkv6_reference(r, k, v, w, u, state)

    monkeypatch.setattr(model_mod, "wkv6", spy)
    with torch.no_grad():
        RWKV6.from_config(RWKV6Config(**tiny, wkv_backend="chunked"), device="cpu")(torch.zeros(1, 3, dtype=torch.long))
        RWKV6.from_config(RWKV6Config(**tiny), device="cpu")(torch.zeros(1, 3, dtype=torch.long))
    assert seen == ["chunked", "auto"]


def test_train_flag_reaches_the_model_config():
    from rwkv_bone.train.args import parse_args
    from rwkv_bone.train.run import load_base

    base = ["--load_model", "", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "50", "--peft", "none", "--dry_run"]
    assert load_base(parse_args(base))[0].wkv_backend == "auto"
    assert load_base(parse_args(base + ["--wkv_backend", "fla"]))[0].wkv_backend == "fla"
    with pytest.raises(SystemExit):
        parse_args(base + ["--wkv_backend", "triton"])


def _gpu_ready() -> bool:
    import torch

    return HAVE_FLA and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and flash-linear-attention")
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype, tol", [("float32", 2e-3), ("bfloat16", 4e-2)])
def test_fla_on_the_gpu_matches_the_reference_with_packed_rows(mode, dtype, tol):
    """On a GPU (the chunk kernel's only test): T = 150 (not a multiple of 64), head size 64,
    initial state, doc starts; values and every gradient against the float64 reference."""
    import torch

    from rwkv_bone.wkv import wkv6_fla, wkv6_reference
    from rwkv_bone.wkv.resets import wkv6_with_doc_starts

    g = torch.Generator().manual_seed(5)
    B, T, H, N = 2, 150, 2, 64
    xs = [torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3)]
    xs += [-6.0 + 7.0 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64),
           torch.randn(H, N, generator=g, dtype=torch.float64),
           0.3 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64)]
    gy, gs = torch.randn(B, T, H, N, generator=g, dtype=torch.float64), torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    ds = torch.zeros(B, T, dtype=torch.bool)
    ds[0, [0, 70, 71]] = True
    ds[1, 101] = True

    def solve(op, leaves):
        y, s = op(*leaves)
        grads = torch.autograd.grad((y.double() * gy.to(y.device)).sum() + (s.double() * gs.to(y.device)).sum(), leaves)
        return [t.detach().double().cpu() for t in (y, s, *grads)]

    want = solve(lambda *a: wkv6_with_doc_starts(wkv6_reference, *a, ds), [x.clone().requires_grad_() for x in xs])
    dt = getattr(torch, dtype)
    leaves = [x.to("cuda", dt if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(xs)]
    got = solve(lambda *a: wkv6_fla(*a, doc_start=ds.cuda(), mode=mode), leaves)
    errs = {n: ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for n, a, b in zip(NAMES, got, want)}
    assert all(e <= tol for e in errs.values()), errs


if __name__ == "__main__":
    print(json.dumps(_child()))

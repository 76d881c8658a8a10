"""WKV6 CUDA kernel: compiles (wherever nvcc exists) and matches the reference (on a GPU)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from rwkv_bone.wkv import cuda as wkv_cuda
from rwkv_bone.wkv import wkv6, wkv6_reference

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def torch_includes() -> list[str]:
    dirs = include_paths() + [sysconfig.get_paths()["include"]]
    return [f"-I{d}" for d in dirs]


def find_cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    homes += [str(p) for p in Path(NVCC).resolve().parents] if NVCC else []
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """A syntax or type error in the .cu cannot land: compile it as torch's build would."""
    cmd = [
        NVCC, "-c", str(wkv_cuda.SOURCES[1]), "-o", str(tmp_path / "wkv6_cuda.o"),
        "-arch=sm_80", "-std=c++20", "-D_N_=64", *COMMON_NVCC_FLAGS, *wkv_cuda.NVCC_FLAGS,
        *torch_includes(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "error" not in done.stderr.lower(), done.stderr[-4000:]


@needs_nvcc
@pytest.mark.slow
def test_cuda_bindings_pass_a_compiler_syntax_check(tmp_path):
    """The .cpp bindings against torch's headers (C++ front end only; ~20 s of CPU)."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    # CPU builds of torch ship the c10/cuda headers but not this generated one.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    cuda_include = find_cuda_include()
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found next to nvcc")
    cmd = [
        gxx, "-std=c++20", "-fsyntax-only", "-D_N_=64", "-DTORCH_EXTENSION_NAME=wkv6_check",
        *torch_includes(), f"-I{cuda_include}", f"-I{tmp_path}", str(wkv_cuda.SOURCES[0]),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def make_inputs(B, T, H, N, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = -8.0 + 10.5 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)  # [-8, 2.5]
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    s = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (r, k, v, w, u, s)]


def outputs_and_grads(fn, inputs, seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s)
    ((y * gy).sum() + (s * gs).sum()).backward()
    return [y, s] + [x.grad for x in leaves]


def max_rel_errors(got, want):
    names = ["y", "state", "gr", "gk", "gv", "gw", "gu", "gstate"]
    out = {}
    for name, a, b in zip(names, got, want):
        b = b.detach().double().cpu()
        diff = (a.detach().double().cpu() - b).abs().max().item()
        out[name] = diff / max(1.0, b.abs().max().item())
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 37, 100])
def test_cuda_kernel_matches_reference_float32(T):
    inputs = make_inputs(2, T, 2, 64, "cuda", torch.float32, seed=T)
    assert wkv_cuda.cuda_kernel_available(), "the CUDA extension did not build"
    got = outputs_and_grads(wkv_cuda.wkv6_cuda, inputs)
    want = outputs_and_grads(wkv6_reference, [x.double() for x in inputs])
    errs = max_rel_errors(got, want)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.gpu
@needs_gpu
def test_cuda_kernel_bfloat16_is_close_and_keeps_dtypes():
    inputs = make_inputs(2, 37, 2, 64, "cuda", torch.float32, seed=3)
    bf = [x.bfloat16() if i < 3 else x for i, x in enumerate(inputs)]  # r, k, v in bf16
    got = outputs_and_grads(wkv_cuda.wkv6_cuda, bf)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    want = outputs_and_grads(wkv6_reference, [x.double() for x in bf])
    errs = max_rel_errors(got, want)
    assert max(errs.values()) < 3e-2, errs


@pytest.mark.gpu
@needs_gpu
def test_dispatcher_uses_cuda_kernel_and_float64_falls_back_to_chunked(monkeypatch):
    import rwkv_bone.wkv as wkv

    served = []  # which backend wkv6 dispatched to, one entry per call

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            served.append(name)
            return fn(*args, **kwargs)
        return wrapped

    # Patched only in the dispatcher's namespace: the self-check's own chunked solve is not counted.
    monkeypatch.setattr(wkv, "wkv6_cuda", spy("cuda", wkv.wkv6_cuda))
    monkeypatch.setattr(wkv, "wkv6_chunked", spy("chunked", wkv.wkv6_chunked))
    inputs = make_inputs(2, 37, 2, 64, "cuda", torch.float64, seed=4)
    want = outputs_and_grads(wkv6_reference, inputs)
    got64 = outputs_and_grads(wkv6, inputs)  # float64 on CUDA -> chunked path
    assert served == ["chunked"], served
    assert max(max_rel_errors(got64, want).values()) < 1e-10
    served.clear()
    got32 = outputs_and_grads(wkv6, [x.float() for x in inputs])  # -> CUDA kernel
    assert served and set(served) == {"cuda"}, served  # (the first call's self-check also runs the kernel)
    assert max(max_rel_errors(got32, want).values()) < 1e-4
    served.clear()
    outputs_and_grads(wkv6, [x.float() for x in inputs])
    assert served == ["cuda"], served  # trusted: exactly one kernel call, no fallback

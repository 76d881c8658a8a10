"""WKV6 CUDA kernel: build (torch.utils.cpp_extension.load, cached) and autograd wrapper.

The kernels (cuda/wkv6_cuda.cu, bound in cuda/wkv6_op.cpp) run the recurrence of reference.py
token by token, one block of N threads per (batch, head), in float32 registers:
    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t^T v_t,
with r, k, v, y in float32 / bfloat16 / float16, and w, u and the states in float32. The backward
kernels return every gradient, including the initial state's (see the .cu for the equations).
The build happens on first use and is cached by functools.lru_cache in the process and by torch in
its extension build directory (~/.cache/torch_extensions) across processes.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

HEAD_SIZE = 64
SOURCE_NAMES = ("wkv6_op.cpp", "wkv6_cuda.cu")


def source_dir() -> Path:
    """Where the kernel sources are: the copy an installed wheel carries (setup.py puts cuda/ in
    rwkv_bone/wkv/cuda_src/), else the source checkout's top-level cuda/."""
    here = Path(__file__).resolve().parent
    for d in (here / "cuda_src", here.parents[1] / "cuda"):
        if all((d / n).is_file() for n in SOURCE_NAMES):
            return d
    return here.parents[1] / "cuda"  # the build then names the missing file


SOURCE_DIR = source_dir()
SOURCES = tuple(SOURCE_DIR / n for n in SOURCE_NAMES)
NVCC_FLAGS = ["-O3", "--use_fast_math", "-Xptxas", "-O3", "--extra-device-vectorization"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def load_extension(head_size: int = HEAD_SIZE) -> ModuleType:
    """Compile (or load from torch's build cache) the kernels for one head size."""
    from torch.utils.cpp_extension import load

    define = f"-D_N_={head_size}"
    return load(
        name=f"rwkv_bone_wkv6_n{head_size}",
        sources=[str(p) for p in SOURCES],
        extra_cflags=["-O3", define],
        extra_cuda_cflags=NVCC_FLAGS + [define],
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def cuda_kernel_available(head_size: int = HEAD_SIZE) -> bool:
    """True when a GPU is present and the extension builds; warns once with the reason if not."""
    if head_size != HEAD_SIZE or not torch.cuda.is_available():
        return False
    try:
        load_extension(head_size)
    except Exception as exc:  # a missing nvcc/ninja or a compiler error: fall back, but say so
        warnings.warn(
            f"wkv6: the CUDA kernel did not build ({type(exc).__name__}: {exc}); "
            "using the chunked PyTorch path instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


class WKV6CUDA(torch.autograd.Function):
    """r, k, v: (B, T, H, N) contiguous, one kernel dtype; w: (B, T, H, N) float32 raw decay;
    u: (H, N) float32; s0: (B, H, N, N) float32. Returns y (r's dtype) and the final state."""

    @staticmethod
    def forward(ctx, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor):
        ext = load_extension(r.shape[-1])
        y, sT = ext.forward(r, k, v, w, u, s0)
        ctx.save_for_backward(r, k, v, w, u, s0)
        return y, sT

    @staticmethod
    def backward(ctx, gy: Tensor | None, gsT: Tensor | None):
        r, k, v, w, u, s0 = ctx.saved_tensors
        gy = torch.zeros_like(r) if gy is None else gy.to(r.dtype).contiguous()
        gsT = torch.zeros_like(s0) if gsT is None else gsT.float().contiguous()
        ext = load_extension(r.shape[-1])
        gr, gk, gv, gw, gu, gs0 = ext.backward(r, k, v, w, u, s0, gy, gsT)
        return gr, gk, gv, gw, gu, gs0


def wkv6_cuda(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """WKV6 on the GPU kernel (no argument checks; use `rwkv_bone.wkv.wkv6`).

    r, k, v share a dtype among float32 / bfloat16 / float16; w, u, state are used in float32.
    Returns y in r's dtype and the final state in float32.
    """
    B, T, H, N = r.shape
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.float()
    if T == 0:
        return r.new_zeros(B, 0, H, N), s0.clone()
    return WKV6CUDA.apply(
        r.contiguous(), k.contiguous(), v.contiguous(), w.float().contiguous(),
        u.float().contiguous(), s0.contiguous(),
    )

"""Few-row matrix products for one-token decoding: y (B, N) = x (B, K) W (N, K)^T on the CPU.

At decode time a model step multiplies a handful of rows by every weight matrix, so its cost is
reading the weights once. torch's CPU matmul does not stream them at the memory's speed for
few rows (bench/bench_gemv.py, 2-core EPYC, L24 C2048 weight shapes, bench/results/bench_gemv.txt:
fp32 22 GB/s at B = 1 and 10-12 GB/s at B = 2..16; bf16 21-29 GB/s), while a kernel that loads
each vector of W once and keeps R x B accumulators in registers reads them at 44-45 GB/s at B = 1
and 27-33 GB/s at B = 8 (gemv.c). Math: y[b, o] = sum_k W[o, k] x[b, k], float32 accumulation; fp32
W with fp32 x (FMAs), bf16 W with bf16 x (vdpbf16ps: exact bf16 products summed in float32, as
torch's bf16 matmul sums them), the result rounded to x's dtype.

The C source is compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`)
into ~/.cache/rwkv_bone (or $XDG_CACHE_HOME/rwkv_bone), named by a hash of the source, the flags
and the compiler, written atomically, and loaded with ctypes. It links the libgomp torch has
already loaded (same soname), so it shares torch's OpenMP thread pool and uses
torch.get_num_threads() threads. It needs AVX-512F and AVX512-BF16; elsewhere (no compiler, another
CPU) `available()` is False and callers use torch's matmul. Before first use it checks itself
against a float64 product on ragged sizes (rows that do not divide its blocks, batches of 1..19)
in both dtypes; any disagreement warns once and turns it off for the process.

Weights can also be packed in panels of PANEL rows (`pack`, `pack_`; gemv.c explains the layout,
rwkv_bone/gemv/packed.py holds the decode model's PackedLinear): at batch 8 the packed kernel reads
W at ~41 GB/s where the row-major one reads ~26 (fp32), and bf16 alike. The self-check covers both
dtypes of it too, and the float32
WKV6 state update of RWKV6.step (`wkv_step`: S read once and S' written once, where torch's ops
read S three times and write two N x N tensors per head).
"""
from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import native

SOURCE = Path(__file__).with_name("gemv.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
MAX_ROWS = 16  # the largest batch bench_gemv.py measured (fp32 2.25x torch, bf16 0.95x); above: torch
K_MULTIPLE = 32  # the kernels step over K in vectors of 16 fp32 / 32 bf16 values
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |y - ref| / max(1, max |ref|)
_enabled = True


def set_enabled(flag: bool) -> bool:
    """Turn the kernel on or off for this process (the benchmarks time torch's path beside it);
    returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def build() -> Path:
    """Compile gemv.c (or reuse the cached build, see rwkv_bone/native.py); the library's path."""
    return native.build(SOURCE, CFLAGS)


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None where they cannot run (said once, as a warning, unless the CPU
    simply lacks AVX-512)."""
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as exc:  # no compiler, a compiler error, a library that does not load
        warnings.warn(f"gemv: the CPU decode kernel is not available ({exc}); decoding uses torch's "
                      "matmul", RuntimeWarning, stacklevel=3)
        return None
    if not lib.rb_gemv_supported():
        return None  # built without AVX-512 BF16: nothing to use, nothing wrong
    for name in ("rb_gemv_f32", "rb_gemv_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("rb_gemv_f32_packed", "rb_gemv_bf16_packed", "rb_gemv_f32_kn"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.rb_gemv_pack32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rb_gemv_pack32.restype = None
    lib.rb_gemv_pack32_inplace.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rb_gemv_pack32_inplace.restype = ctypes.c_int
    lib.rb_wkv_step_f32.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.rb_wkv_step_f32.restype = None
    lib.rb_gemv_set_rows.argtypes = [ctypes.c_int] * 3
    lib.rb_gemv_get_rows.argtypes = [ctypes.c_int] * 2
    return lib


def _run(lib: ctypes.CDLL, x: Tensor, w: Tensor, threads: int) -> Tensor:
    B, K = x.shape
    y = torch.empty(B, w.shape[0], dtype=torch.float32)
    fn = lib.rb_gemv_bf16 if w.dtype == torch.bfloat16 else lib.rb_gemv_f32
    if fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), B, w.shape[0], K, threads) != 0:
        raise RuntimeError(f"gemv refused sizes B={B} N={w.shape[0]} K={K}")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


PANEL = 48  # rows of W per panel of the packed layout (gemv.c PANEL): 3 vectors of 16 outputs
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(dtype: torch.dtype, n_out: int, n_in: int) -> bool:
    """Whether an (n_out, n_in) weight of dtype fits the packed layout: float32 or bfloat16, n_out a
    multiple of 16 (whole vectors of outputs), and for bfloat16 n_in even (x is read in pairs)."""
    return dtype in PACKED_DTYPES and n_out % 16 == 0 and n_in >= 1 and (dtype == torch.float32 or n_in % 2 == 0)


def _words(w: Tensor, name: str) -> Tensor:
    """W (N, K) as the (N, K / g) 32-bit words the layout transposes (gemv.c: a bf16 word is the
    pair W[o, 2i], W[o, 2i + 1]); ValueError for what the packed kernel cannot take."""
    N, K = w.shape
    if not can_pack(w.dtype, N, K):
        raise ValueError(f"{name}: needs a float32 or bfloat16 (N, K) weight with N a multiple of 16 (and K even "
                         f"for bfloat16), got {tuple(w.shape)} {w.dtype}")
    return w.view(torch.int32)


def _pack_words(words: Tensor) -> Tensor:
    """torch's transposition of (N, K) words into panels: flat (N * K,)."""
    N, K = words.shape
    out = torch.empty(N * K, dtype=words.dtype, device=words.device)
    full = N // PANEL * PANEL
    if full:
        out[:full * K].view(full // PANEL, K, PANEL).copy_(words[:full].view(full // PANEL, PANEL, K).transpose(1, 2))
    if full < N:
        out[full * K:].view(K, N - full).copy_(words[full:].t())
    return out


def pack(w: Tensor) -> Tensor:
    """W (N, K) float32 or bfloat16, N a multiple of 16 -> W packed for the packed kernel: a flat
    (N * K,) tensor of W's dtype holding panels; panel p holds rows 48p .. 48p+h-1 (h = 48, or the
    rows left) as one (words, h) row-major block of 32-bit words, a word being one float32 or a pair
    of bf16 along K (see gemv.c and rwkv_bone/gemv/packed.py). New memory; W is not changed."""
    words = _words(w.contiguous(), "pack")
    lib = _library() if w.device.type == "cpu" else None
    if lib is None:
        return _pack_words(words).view(w.dtype)
    out = torch.empty(words.numel(), dtype=torch.int32)
    lib.rb_gemv_pack32(words.data_ptr(), out.data_ptr(), *words.shape, torch.get_num_threads())
    return out.view(w.dtype)


def pack_(w: Tensor) -> Tensor:
    """`pack` in place: W's own storage rearranged into the panel layout (C, no second copy of W),
    returned as a flat view of it. W must be contiguous and no longer be read as (N, K). (A weight
    mapped from a checkpoint is a private mapping, checkpoint.py: its pages turn into the process's
    own copies as they are written; the file is never changed.)"""
    if not w.is_contiguous():
        raise ValueError(f"pack_: needs a contiguous weight, got strides {w.stride()}")
    words = _words(w, "pack_")
    lib = _library() if w.device.type == "cpu" else None
    if lib is None:
        return w.view(-1).copy_(_pack_words(words).view(w.dtype))
    if lib.rb_gemv_pack32_inplace(words.data_ptr(), *words.shape, torch.get_num_threads()) != 0:
        raise MemoryError(f"gemv.pack_: no scratch memory for a panel of {PANEL} x {words.shape[1]} words")
    return w.view(-1)


def unpack(packed: Tensor, n_out: int, n_in: int) -> Tensor:
    """The (N, K) row-major weight back from `pack`'s output (a new tensor, the same bits)."""
    w = torch.empty(n_out, n_in, dtype=packed.dtype, device=packed.device)
    words, flat = w.view(torch.int32), packed.view(torch.int32)
    N, K = words.shape
    full = N // PANEL * PANEL
    if full:
        words[:full].view(full // PANEL, PANEL, K).copy_(flat[:full * K].view(full // PANEL, K, PANEL).transpose(1, 2))
    if full < N:
        words[full:].copy_(flat[full * K:].view(K, N - full).t())
    return w


def _run_packed(lib: ctypes.CDLL, x: Tensor, packed: Tensor, n_out: int, threads: int) -> Tensor:
    B, K = x.shape
    y = torch.empty(B, n_out, dtype=torch.float32)
    fn = lib.rb_gemv_bf16_packed if packed.dtype == torch.bfloat16 else lib.rb_gemv_f32_packed
    if fn(packed.data_ptr(), x.data_ptr(), y.data_ptr(), B, n_out, K, threads) != 0:
        raise RuntimeError(f"gemv refused packed sizes B={B} N={n_out} K={K} ({packed.dtype})")
    return y


def _run_kn(lib: ctypes.CDLL, x: Tensor, w: Tensor, threads: int) -> Tensor:
    B, K = x.shape
    y = torch.empty(B, w.shape[1], dtype=torch.float32)
    if lib.rb_gemv_f32_kn(w.data_ptr(), x.data_ptr(), y.data_ptr(), B, w.shape[1], K, threads) != 0:
        raise RuntimeError(f"gemv refused (K, N) sizes B={B} K={K} N={w.shape[1]}")
    return y


def try_matmul(x: Tensor, w: Tensor) -> Optional[Tensor]:
    """x (B, K) @ w (K, N) -> (B, N) float32 through the panel kernel, reading w's rows in place
    (RWKV6.step's x @ time_maa_w1, @ time_maa_w2[i], @ time_decay_w1/w2: small weights torch's sgemm
    reads at a few GB/s at few rows); None where it does not apply (kernel off or unavailable, not
    float32 CPU 2-D tensors, w not contiguous, N not a multiple of 16, autograd recording)."""
    if not (_enabled and x.dim() == 2 and w.dim() == 2 and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and w.device.type == "cpu" and x.shape[0] >= 1 and x.shape[1] == w.shape[0]
            and w.shape[1] % 16 == 0 and w.shape[1] >= 16 and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and available()):
        return None
    return _run_kn(_library(), x.contiguous(), w, torch.get_num_threads())


def wkv_step_reference(S: Tensor, r: Tensor, k: Tensor, v: Tensor, d: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One WKV6 step in torch: S (B, H, N, N), r k v d (B, H, N), u (H, N) -> y (B, H, N), S'.
    y = r S + (r . u . k) v, S' = diag(d) S + k^T v (RWKV6.step's math)."""
    y = torch.matmul(r.unsqueeze(2), S).squeeze(2) + (r * u * k).sum(-1, keepdim=True) * v
    S = (k.unsqueeze(3) * v.unsqueeze(2)).addcmul_(d.unsqueeze(3), S)  # one (B, H, N, N) allocation
    return y, S


def _run_wkv_step(lib: ctypes.CDLL, S: Tensor, r: Tensor, k: Tensor, v: Tensor, d: Tensor, u: Tensor,
                  threads: int) -> tuple[Tensor, Tensor]:
    B, H, N = r.shape
    r, k, v, d, u, S = (t.contiguous() for t in (r, k, v, d, u, S))
    y, S2 = torch.empty(B, H, N), torch.empty(B, H, N, N)
    lib.rb_wkv_step_f32(S.data_ptr(), r.data_ptr(), k.data_ptr(), v.data_ptr(), d.data_ptr(), u.data_ptr(),
                        y.data_ptr(), S2.data_ptr(), B * H, H, N, threads)
    return y, S2


def wkv_step(S: Tensor, r: Tensor, k: Tensor, v: Tensor, d: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """`wkv_step_reference` through the C kernel where it runs (float32 CPU tensors, no autograd),
    reading S once and writing S' once; torch elsewhere. Same shapes, a new S' (S is not changed)."""
    tensors = (S, r, k, v, d, u)
    if (_enabled and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and available()):
        return _run_wkv_step(_library(), S, r, k, v, d, u, torch.get_num_threads())
    return wkv_step_reference(S, r, k, v, d, u)


def self_check_errors(lib: ctypes.CDLL) -> dict[str, float]:
    """Relative errors of the kernels against a float64 product: rows N = 1, 37 and 101 (not a
    multiple of any block), K = 32 and 96, batches 1..19 (every block size, and groups of 8 with
    a remainder), on 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    errors: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        worst = 0.0
        for N, K in ((1, 32), (37, 96), (101, 32)):
            w = torch.randn(N, K, generator=g).to(dtype)
            for B in range(1, 20):
                x = torch.randn(B, K, generator=g).to(dtype)
                ref = x.double() @ w.double().t()
                for threads in (1, 2):
                    y = _run(lib, x, w, threads).double()
                    worst = max(worst, float((y - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        errors[str(dtype).removeprefix("torch.")] = worst
    for dtype in PACKED_DTYPES:
        worst = 0.0
        for N, K in ((16, 2), (48, 38), (112, 96), (80, 32)):  # one partial panel, two, a panel and a part
            w = torch.randn(N, K - (dtype == torch.float32), generator=g).to(dtype)  # fp32: odd K too
            packed = pack(w)
            for B in range(1, 20):
                x = torch.randn(B, w.shape[1], generator=g).to(dtype)
                ref = x.double() @ w.double().t()
                for threads in (1, 2):
                    y = _run_packed(lib, x, packed, N, threads).double()
                    worst = max(worst, float((y - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        errors[str(dtype).removeprefix("torch.") + " packed"] = worst
    worst = 0.0
    for B, H, N in ((1, 1, 4), (3, 2, 64), (2, 3, 24)):
        S, r, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, N, N), (B, H, N), (B, H, N), (B, H, N)))
        d, u = torch.rand(B, H, N, generator=g), torch.randn(H, N, generator=g)
        want = wkv_step_reference(*(t.double() for t in (S, r, k, v, d, u)))
        for threads in (1, 2):
            for got, ref in zip(_run_wkv_step(lib, S, r, k, v, d, u, threads), want):
                worst = max(worst, float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    errors["float32 wkv step"] = worst
    worst = 0.0
    for K, N in ((1, 16), (37, 80), (96, 160)):
        w = torch.randn(K, N, generator=g)
        for B in range(1, 20):
            x = torch.randn(B, K, generator=g)
            ref = x.double() @ w.double()
            for threads in (1, 2):
                y = _run_kn(lib, x, w, threads).double()
                worst = max(worst, float((y - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    errors["float32 (K, N)"] = worst
    return errors


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the kernels built, run on this CPU and passed their self-check."""
    lib = _library()
    if lib is None:
        return False
    try:
        errors = self_check_errors(lib)
    except Exception as exc:
        warnings.warn(f"gemv: the CPU decode kernel failed its self-check ({exc}); decoding uses "
                      "torch's matmul", RuntimeWarning, stacklevel=2)
        return False
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[getattr(torch, k.split()[0])]}  # NaN is bad
    if bad:
        warnings.warn(f"gemv: the CPU decode kernel disagrees with float64 ({bad}); decoding uses "
                      "torch's matmul", RuntimeWarning, stacklevel=2)
        return False
    return True


def applies(x: Tensor, w: Tensor) -> bool:
    """Whether `linear(x, w)` runs the kernel: CPU tensors, x (B <= MAX_ROWS, K) and w (N, K)
    contiguous, both float32 or both bfloat16, K a multiple of 32, no autograd."""
    return (_enabled and x.dim() == 2 and w.dim() == 2 and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == w.dtype and x.dtype in TOLERANCE and 1 <= x.shape[0] <= MAX_ROWS
            and x.shape[1] == w.shape[1] and w.shape[1] % K_MULTIPLE == 0 and w.shape[0] >= 1
            and x.is_contiguous() and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and available())


def try_linear(x: Tensor, w: Tensor) -> Optional[Tensor]:
    """x (B, K) @ w (N, K)^T -> (B, N) in x's dtype through the kernel, or None when it does not
    apply (see `applies`): one check, for the decode step's hot path."""
    if not applies(x, w):
        return None
    return _run(_library(), x, w, torch.get_num_threads())


def try_packed_linear(x: Tensor, packed: Tensor, n_out: int) -> Optional[Tensor]:
    """x (B, K) @ W^T -> (B, n_out) float32 for W packed by `pack`, through the packed kernel (any
    B: at B = 1024 it still runs 2.3x torch's sgemm here, near the FMA ceiling); None where it does
    not apply (kernel off or unavailable, x not a CPU (B, K) tensor of the packed weight's dtype,
    autograd recording x)."""
    if not (_enabled and x.dim() == 2 and x.dtype == packed.dtype and x.dtype in PACKED_DTYPES and x.device.type == "cpu"
            and x.shape[0] >= 1 and x.shape[1] * n_out == packed.numel()
            and not (torch.is_grad_enabled() and x.requires_grad) and available()):
        return None
    return _run_packed(_library(), x.contiguous(), packed, n_out, torch.get_num_threads())


def linear(x: Tensor, w: Tensor) -> Tensor:
    """`try_linear` for a caller that knows the kernel applies; ValueError if it does not."""
    y = try_linear(x, w)
    if y is None:
        raise ValueError("gemv.linear: the kernel does not apply to these tensors (see gemv.applies)")
    return y

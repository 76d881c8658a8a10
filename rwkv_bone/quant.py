"""A quantised frozen base: the adapted att/ffn linears keep their weight W (out, in) quantised.

    nf4 / fp4 (bitsandbytes 4-bit, blocks of 64 weights along the flattened W, one fp32 absmax
              per block):  W ~ absmax_blk * code[q],  q in 0..15   (0.5 + 4/64 bytes per weight)
    int8      (bitsandbytes row-wise absmax):  W[o, :] ~ s_o / 127 * q[o, :],  q int8   (1 + 4/in)

`QuantLinear` is the frozen linear itself: forward(x) = x W^T (through bitsandbytes' 4-bit matmul,
or the int8 weight with its row scales), and `input_grad(g)` = g W, the only gradient a frozen
weight needs; W is rebuilt only transiently inside those calls (never stored, never trained).
Adapters hold a QuantLinear in place of their weight (rwkv_bone.peft.inject.quantize_frozen, where
the frozen base is built; this module knows no adapter): Bone-row / Bone-AB run
it on their transformed input x~ (rwkv_bone.peft.bone), LoRA adds its low-rank path to its output,
PiSSA / OLoRA quantise W_res after the factorisation (as QPiSSA). Adapters stay fp32; emb, head,
norms and time_* are untouched. merge.py merges into the original full-precision base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # 4-bit: weights per absmax


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # a broken install (it is a dependency)
        raise UserError(f"--quant needs the bitsandbytes package, which failed to import ({e}); "
                        "reinstall it with pip install bitsandbytes, or drop --quant") from e
    return bnb, bnbf


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T for a QuantLinear; backward gives only dL/dx = g W (W is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.layer.input_grad(g), None


class QuantLinear(nn.Module):
    """A frozen y = x W^T (+ bias) whose W (out, in) is stored quantised (see the module docstring).

    Buffers (not parameters: nothing here trains): qweight (packed uint8 for 4-bit, (out, in) int8
    for int8), absmax_bits (the fp32 absmax per block, or per row for int8, as int32 bits), bias."""

    def __init__(self, weight: Tensor, quant: str, bias: Tensor | None = None):
        super().__init__()
        if quant not in QUANT_TYPES:
            raise UserError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
        _, bnbf = _bnb()
        self.out_features, self.in_features = weight.shape
        self.quant = quant
        w = weight.detach().float()
        with torch.no_grad():
            if quant == "int8":
                q, absmax, _ = bnbf.int8_vectorwise_quant(w)         # q (out, in), absmax (out,)
                self.code = None
            else:
                if w.numel() % BLOCKSIZE:
                    raise UserError(f"--quant {quant} packs blocks of {BLOCKSIZE} weights, but a layer "
                                    f"of shape {tuple(w.shape)} has {w.numel()}; use --quant int8")
                try:
                    q, st = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=False,
                                               quant_type=quant)
                except (RuntimeError, NotImplementedError) as e:
                    raise UserError(f"this bitsandbytes build cannot quantise to {quant} on "
                                    f"{w.device.type} ({e}); choose another --quant") from e
                absmax, self.code = st.absmax, st.code
        self.register_buffer("qweight", q)
        # The fp32 scales are kept as their int32 bit pattern: module.bfloat16() (DeepSpeed's bf16
        # mode, Lightning precision plugins) casts floating buffers, never integer ones.
        self.register_buffer("absmax_bits", absmax.float().contiguous().view(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # ---- the frozen weight, rebuilt on demand -------------------------------------------------
    @property
    def absmax(self) -> Tensor:
        return self.absmax_bits.view(torch.float32)

    def _state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.code.to(self.qweight.device), blocksize=BLOCKSIZE,
                          quant_type=self.quant, dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (out, in) in `dtype`, a fresh tensor."""
        if self.quant == "int8":
            return (self.qweight.to(dtype) * (self.absmax / 127).to(dtype).unsqueeze(1))
        _, bnbf = _bnb()
        return bnbf.dequantize_4bit(self.qweight, self._state(dtype)).to(dtype)

    @torch.no_grad()
    def matmul(self, x: Tensor) -> Tensor:
        """x (..., in) -> x W^T (..., out) in x's dtype (no bias, no autograd)."""
        if self.quant == "int8":  # scale the output rows instead of W: (x q^T) * s / 127
            return F.linear(x, self.qweight.to(x.dtype)) * (self.absmax / 127).to(x.dtype)
        bnb, _ = _bnb()
        return bnb.matmul_4bit(x, self.qweight.t(), self._state(x.dtype))

    @torch.no_grad()
    def input_grad(self, g: Tensor) -> Tensor:
        """g (..., out) -> dL/dx = g W (..., in)."""
        if self.quant == "int8":
            return (g * (self.absmax / 127).to(g.dtype)) @ self.qweight.to(g.dtype)
        return g @ self.dequantize(g.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast compute in its dtype, as autocast would for a plain linear.
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            y = _FrozenMatmul.apply(x.to(dt), self)
            return y if self.bias is None else y + self.bias.to(dt)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quant={self.quant}"


def check_device_support(quant: str, device: torch.device | str) -> None:
    """Quantise and use a tiny layer on `device`; one sentence if this bitsandbytes build cannot."""
    try:
        q = QuantLinear(torch.randn(8, BLOCKSIZE), quant).to(device)
        q(torch.randn(2, BLOCKSIZE, device=device))
    except UserError:
        raise
    except Exception as e:  # bitsandbytes raises various types for a missing backend
        alt = "use --quant int8 (plain torch ops on any device)" if quant != "int8" else "drop --quant"
        raise UserError(f"the installed bitsandbytes cannot run --quant {quant} on {torch.device(device).type} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {alt}, or install "
                        "a bitsandbytes build for this device") from e


def frozen_weight_bytes(model: nn.Module) -> tuple[int, str]:
    """(bytes, description) of everything frozen in `model`: parameters that do not train and the
    quantised buffers, e.g. (123456, "bf16 + nf4")."""
    total, kinds = 0, []
    for p in model.parameters():
        if not p.requires_grad:
            total += p.numel() * p.element_size()
            kinds.append(str(p.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32"))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes()
            kinds.append(m.quant)
    return total, " + ".join(dict.fromkeys(kinds)) or "none"

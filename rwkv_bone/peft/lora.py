"""LoRA, PiSSA and OLoRA adapters for a frozen nn.Linear (the baselines of the Bone paper).

Torch layout: W (out, in), y = x W^T. All three train A (r, in) and B (out, r):

    y = F.linear(x, W0) + scale * F.linear(F.linear(dropout(x), A), B),   merged W' = W0 + scale * B A

    LoRA  (Hu et al.): W0 = W, A kaiming-uniform, B = 0, scale = alpha / r.
    PiSSA (Meng et al.): W ~ U S V^T (top r, torch.svd_lowrank with `niter` subspace iterations),
          A0 = sqrt(S) V^T, B0 = U sqrt(S), W0 = W_res = W - B0 A0, scale = 1.
    OLoRA (Buyukakyuz): W = Q R (reduced QR), B0 = Q[:, :r], A0 = R[:r], W0 = W - B0 A0, scale = 1.

PiSSA/OLoRA start exactly at the base output (W_res + B0 A0 = W up to rounding). They are the one
case where the frozen weight changes: W_res is written in place into the same Parameter's data
(no second weight-sized copy kept), and A0/B0 are kept as buffers so an adapter file can rebuild
W_res from the untouched base checkpoint (merge: W_res + B A = W - B0 A0 + B A).

Adapter tensors are float32 whatever the base dtype; the forward casts them to the activation dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .fold import fold_into_linear
from .registry import MethodCode

LORA_INITS = ("lora", "pissa", "olora")


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """delta (out, in) = scale * B A."""
    return (lora_B @ lora_A) * scale


def pissa_factors(weight: torch.Tensor, r: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in float32 from the top-r randomized SVD of W."""
    U, S, V = torch.svd_lowrank(weight.float(), q=r, niter=niter)   # U (out, r), S (r,), V (in, r)
    root = S.sqrt()
    return (V * root).t().contiguous(), (U * root).contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in float32 from the reduced QR of W: B0 = Q[:, :r], A0 = R[:r]."""
    Q, R = torch.linalg.qr(weight.float())
    return R[:r].contiguous(), Q[:, :r].contiguous()


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a LoRA-family adapter (see the module docstring for the math)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "lora", niter: int = 4, name: str = "linear",
                 init_factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if init not in LORA_INITS:
            raise UserError(f"unknown LoRA init {init!r}; choose one of {', '.join(LORA_INITS)}")
        if not 1 <= r <= min(base.in_features, base.out_features):
            raise UserError(f"rank r={r} does not fit layer {name} of shape "
                            f"({base.out_features}, {base.in_features}); choose 1 <= r <= "
                            f"{min(base.in_features, base.out_features)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.init = r, init
        self.alpha = float(r if (alpha is None or init != "lora") else alpha)
        self.scale = self.alpha / r
        self.weight = base.weight                 # the SAME Parameter: never copied, stays frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(device=self.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            return
        if self.weight.is_meta:                   # counting parameters only: no factorisation
            self.register_buffer("init_A", torch.empty(r, self.in_features, **kw), persistent=False)
            self.register_buffer("init_B", torch.empty(self.out_features, r, **kw), persistent=False)
            return
        with torch.no_grad():
            if init_factors is not None:          # resuming: A0/B0 recorded in the adapter file
                A0, B0 = (t.to(**kw) for t in init_factors)
            elif init == "pissa":
                A0, B0 = pissa_factors(self.weight, r, niter)
            else:
                A0, B0 = olora_factors(self.weight, r)
            self.lora_A.copy_(A0)
            self.lora_B.copy_(B0)
            w = self.weight
            w.copy_((w.float() - B0 @ A0).to(w.dtype))          # W_res, in place
        self.register_buffer("init_A", A0, persistent=False)    # (r, in)
        self.register_buffer("init_B", B0, persistent=False)    # (out, r)

    def adapter_names(self) -> list[str]:
        return ["lora_A", "lora_B"]

    def init_tensors(self) -> dict[str, torch.Tensor]:
        """The saved but never trained tensors: PiSSA/OLoRA's A0, B0 (W_res = W - B0 A0)."""
        return {} if self.init == "lora" else {"init_lora_A": self.init_A, "init_lora_B": self.init_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        qbase = getattr(self, "qbase", None)      # a QuantLinear (rwkv_bone.quant) or None
        y = F.linear(x, self.weight, self.bias) if qbase is None else qbase(x)
        h = F.linear(self.dropout(x), self.lora_A.to(dt))   # (..., r)
        return y + F.linear(h, self.lora_B.to(dt)) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """delta (out, in) in float32 relative to the weight currently held (W or W_res)."""
        return lora_delta(self.lora_A.float(), self.lora_B.float(), self.scale)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + scale B A, reusing this layer's weight storage."""
        return fold_into_linear(self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, init={self.init}")


# ---- registry code (see registry.py): lora, pissa and olora share everything but the init --------
def check_layer(name: str, out: int, n_in: int, s: dict) -> None:
    return None                                    # the rank is checked per layer by LoraLinear


def build_for(method: str):
    def build(base: nn.Linear, s: dict, name: str, init_factors=None) -> LoraLinear:
        return LoraLinear(base, s["lora_r"], s["lora_alpha"], s["lora_dropout"], init=method,
                          niter=s["svd_niter"], name=name, init_factors=init_factors)
    return build


def shapes_for(method: str):
    def layer_shapes(s: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        r = s["lora_r"]
        shapes = {"lora_A": (r, n_in), "lora_B": (out, r)}
        if method != "lora":                       # A0/B0: W_res = W - B0 A0 is rebuilt from them
            shapes.update(init_lora_A=(r, n_in), init_lora_B=(out, r))
        return shapes
    return layer_shapes


def merged(w: torch.Tensor, s: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoRA W + alpha/r B A; PiSSA/OLoRA W - B0 A0 + B A (float32 in, float32 out)."""
    if "init_lora_A" in t:
        return w - t["init_lora_B"] @ t["init_lora_A"] + t["lora_B"] @ t["lora_A"]
    return w + lora_delta(t["lora_A"], t["lora_B"], s["lora_alpha"] / s["lora_r"])


def _code(method: str) -> MethodCode:
    kinds = ("lora_A", "lora_B") if method == "lora" else ("lora_A", "lora_B", "init_lora_A", "init_lora_B")
    return MethodCode(LoraLinear, build_for(method), check_layer, shapes_for(method), kinds, merged)


LORA, PISSA, OLORA = _code("lora"), _code("pissa"), _code("olora")

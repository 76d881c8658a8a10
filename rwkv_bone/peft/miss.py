"""MiSS (the Bone authors' follow-up, HF PEFT's default "MiSS"; RWKV-PEFT's 2-D `.disha`) for a
frozen nn.Linear: one small tensor per layer and no weight-sized work, in training or merging.

Torch layout: W (out, in), y = x W^T. Cut x into its in/r r-wide slices x_c and sum them:

    default, trainable M (r, out):          y = x W^T + (sum_c x_c) M
    mini,    trainable M (r, mini_r):       the same with M~ = M tiled out/mini_r times along the
                                            output, M~[i, o] = M[i, o mod mini_r]

so the merged weight is W'[o, c*r + i] = W[o, c*r + i] + M~[i, o] (M~^T added to every r-wide
column block). M starts at zero, so the adapted layer equals the base at step 0. The extra work per
token is O(in + r * out) (mini: O(in + r * mini_r) then a broadcast add), never O(in * out).
Gradients come from autograd: dL/dM = s^T g (s = sum_c x_c, (N, r)), dL/dx_c += g M^T for every c.

HF PEFT's MiSS "bat" mode is this project's Bone-col (blocks indexed by the output block), so it
is read and written as Bone-col (see bone.py); in_features must be a multiple of r here (PEFT pads,
RWKV's linears never need it). The tensor is float32 whatever the base dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .fold import fold_into_linear
from .options.miss import MISS_MODES
from .registry import MethodCode


def miss_full(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """(r, out) from a default (r, out) or mini (r, mini_r) block: M~[i, o] = M[i, o mod mini_r]."""
    return block if block.shape[1] == out_features else block.repeat(1, out_features // block.shape[1])


def miss_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The explicit delta (out, in): delta[o, c*r + i] = M~[i, o]; differentiable."""
    out, n_in = weight.shape
    r = block.shape[0]
    full = miss_full(block, out)                                  # (r, out)
    return full.t().unsqueeze(1).expand(out, n_in // r, r).reshape(out, n_in)


def check_miss(name: str, out_features: int, in_features: int, r: int, mode: str, mini_r: int) -> None:
    """MiSS sums r-wide slices of the input (r | in); mini tiles mini_r-wide output groups (mini_r | out)."""
    if mode not in MISS_MODES:
        raise UserError(f"unknown MiSS mode {mode!r}; choose one of {', '.join(MISS_MODES)}")
    if r < 1 or in_features % r:
        raise UserError(f"MiSS rank {r} does not divide in_features={in_features} of layer {name}; "
                        "choose a --miss_r that divides it (e.g. 64, 32 or 16)")
    if mode == "mini" and (mini_r < 1 or out_features % mini_r):
        raise UserError(f"--miss_mini_r {mini_r} does not divide out_features={out_features} of layer "
                        f"{name}; choose one that divides it (e.g. 64)")


class MissLinear(nn.Module):
    """A frozen nn.Linear plus a MiSS adapter (see the module docstring for the math)."""

    def __init__(self, base: nn.Linear, r: int, mode: str = "default", mini_r: int = 1,
                 name: str = "linear"):
        super().__init__()
        check_miss(name, base.out_features, base.in_features, r, mode, mini_r)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.mode, self.mini_r = r, mode, mini_r
        self.weight = base.weight                 # the SAME Parameter: never copied, stays frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        width = self.out_features if mode == "default" else mini_r
        self.miss = nn.Parameter(torch.zeros(r, width, device=self.weight.device, dtype=torch.float32))

    def adapter_names(self) -> list[str]:
        return ["miss"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features).to(dt)                      # (N, in)
        with torch.autocast(dev, enabled=False):
            y = F.linear(x2, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
            s = x2.view(x2.shape[0], -1, self.r).sum(1)                   # (N, r)
            z = s @ self.miss.to(dt)                                      # (N, out) or (N, mini_r)
            y = (y.view(y.shape[0], -1, z.shape[1]) + z.unsqueeze(1)).view_as(y)
        return y.view(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """delta (out, in) in float32."""
        return miss_delta(self.weight, self.miss.float())

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + delta, reusing this layer's weight storage."""
        return fold_into_linear(self)

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.mode == "mini" else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, mode={self.mode}{mini}"


# ---- registry code (see registry.py) -------------------------------------------------------------
def check_layer(name: str, out: int, n_in: int, s: dict) -> None:
    check_miss(name, out, n_in, s["miss_r"], s["miss_mode"], s["miss_mini_r"] or 1)


def build(base: nn.Linear, s: dict, name: str, init_factors=None) -> MissLinear:
    return MissLinear(base, s["miss_r"], s["miss_mode"], s["miss_mini_r"] or 1, name=name)


def layer_shapes(s: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {"miss": (s["miss_r"], out if s["miss_mode"] == "default" else s["miss_mini_r"])}


def merged(w: torch.Tensor, s: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """W' = W + delta (float32 in, float32 out): M~^T added to every r-wide column block."""
    out, n_in = w.shape
    r = t["miss"].shape[0]
    return (w.view(out, n_in // r, r) + miss_full(t["miss"], out).t().unsqueeze(1)).view(out, n_in)


CODE = MethodCode(MissLinear, build, check_layer, layer_shapes, ("miss",), merged)

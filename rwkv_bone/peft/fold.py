"""Folding an adapter layer back into a plain nn.Linear (shared by every adapter kind)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def fold_into_linear(layer: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding W + layer.delta_weight(), reusing the layer's weight storage
    (the layer must not be used afterwards)."""
    w, bias = layer.weight, layer.bias
    qbase = getattr(layer, "qbase", None)
    if qbase is not None:  # quantised base (rwkv_bone.quant): fold into its dequantised weight
        w = nn.Parameter(qbase.dequantize(torch.float32), requires_grad=False)
        bias = None if qbase.bias is None else nn.Parameter(qbase.bias, requires_grad=False)
    w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
    lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    lin.weight, lin.bias = w, bias
    return lin


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen W (out, in) of an adapter layer: its Parameter, or the dequantised QuantLinear (fp32)."""
    q = getattr(layer, "qbase", None)
    return layer.weight if q is None else q.dequantize(torch.float32)

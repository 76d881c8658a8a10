"""Folding an adapter layer back into a plain nn.Linear (shared by every adapter kind)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_into_linear(layer: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding W + layer.delta_weight(), reusing the layer's weight storage
    (the layer must not be used afterwards)."""
    w = layer.weight
    w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight, lin.bias = w, layer.bias
    return lin

"""The reference initialisation of RWKV-6 for training from scratch.

    emb ~ U(+-1e-4);  head orthogonal, gain 0.5*sqrt(V/C) (0.5 when V <= C)
    att.key, att.gate orthogonal gain 0.1;  att.output, ffn.value, ffn.receptance = 0
    att.receptance, att.value, ffn.key orthogonal gain 1
    time_maa_w1 = time_decay_w1 = 0;  time_maa_w2, time_decay_w2 ~ U(+-0.01)
    ratio0 = l/(L-1) (0 -> 1 over depth),  ratio1 = 1 - l/L (1 -> ~0),  ramp_c = c/C in [0, 1)
    time_maa_{x,w,k} = 1 - ramp^ratio1;  time_maa_v = 1 - (ramp^ratio1 + 0.3*ratio0)
    time_maa_{r,g} = 1 - ramp^(0.5*ratio1);  ffn.time_maa_{k,r} = 1 - ramp^ratio1
    time_decay[n] = -6 + 5*(n/(A-1))^(0.7 + 1.3*ratio0)
    time_faaaa[n] = 0.25 + 0.5*(1 - n/(A-1)) + ((n+1) % 3 - 1)*0.1   (a ramp around 0.5, as (H, N))
    ln_x.weight = ((1+l)/L)^0.7, LayerNorms weight 1 bias 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def orthogonal_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill `weight` (out, in) with a random (semi-)orthogonal matrix times `gain`, in place.

    Same distribution as nn.init.orthogonal_ (Q of the QR of a Gaussian matrix, with R's diagonal
    positive), computed as CholeskyQR2 in float64: Q = A R^-1 with R^T R = A^T A, done twice. On
    some CPU builds torch.linalg.qr (its orgqr step) is ~50x slower than this; a (rare) Cholesky
    failure falls back to it."""
    rows, cols = weight.shape
    a = torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64, device=weight.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(a.T @ a)  # lower L with L L^T = A^T A, i.e. R = L^T
        if info.item() != 0:
            return nn.init.orthogonal_(weight, gain=gain)
        a = torch.linalg.solve_triangular(chol.T, a, upper=True, left=False)  # (big, small)
    q = a if rows >= cols else a.T
    weight.copy_((q * gain).to(weight.dtype))
    return weight


@torch.no_grad()
def init_rwkv6_(model: nn.Module) -> None:
    """Initialise an RWKV6 model in place (float32 math, then cast to each parameter's dtype)."""
    cfg = model.config
    L, C, A, V = cfg.n_layer, cfg.n_embd, cfg.dim_att, cfg.vocab_size

    def put(p: torch.Tensor, value: torch.Tensor) -> None:
        p.copy_(value.reshape(p.shape).to(p.dtype))

    def ortho(lin: nn.Linear, gain: float) -> None:
        orthogonal_(lin.weight, gain)

    model.emb.weight.uniform_(-1e-4, 1e-4)
    ortho(model.head, 0.5 * math.sqrt(V / C) if V > C else 0.5)
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()

    dev = model.emb.weight.device
    ramp_c = torch.arange(C, dtype=torch.float32, device=dev) / C  # (C,) in [0, 1)
    n_a = torch.arange(A, dtype=torch.float32, device=dev) / max(A - 1, 1)  # (A,) in [0, 1]
    for layer_id, block in enumerate(model.blocks):
        ratio0 = layer_id / max(L - 1, 1)
        ratio1 = 1.0 - layer_id / L
        for ln in (block.ln1, block.ln2) + ((block.ln0,) if layer_id == 0 else ()):
            ln.weight.fill_(1.0)
            ln.bias.zero_()

        att = block.att
        base = torch.pow(ramp_c, ratio1)
        put(att.time_maa_x, 1.0 - base)
        put(att.time_maa_w, 1.0 - base)
        put(att.time_maa_k, 1.0 - base)
        put(att.time_maa_v, 1.0 - (base + 0.3 * ratio0))
        put(att.time_maa_r, 1.0 - torch.pow(ramp_c, 0.5 * ratio1))
        put(att.time_maa_g, 1.0 - torch.pow(ramp_c, 0.5 * ratio1))
        att.time_maa_w1.zero_()
        att.time_maa_w2.uniform_(-0.01, 0.01)
        put(att.time_decay, -6.0 + 5.0 * torch.pow(n_a, 0.7 + 1.3 * ratio0))
        att.time_decay_w1.zero_()
        att.time_decay_w2.uniform_(-0.01, 0.01)
        n_idx = torch.arange(A, device=dev)
        put(att.time_faaaa, 0.25 + 0.5 * (1.0 - n_a) + ((n_idx + 1) % 3 - 1).float() * 0.1)
        ortho(att.receptance, 1.0)
        ortho(att.key, 0.1)
        ortho(att.value, 1.0)
        ortho(att.gate, 0.1)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)
        att.ln_x.bias.zero_()

        ffn = block.ffn
        put(ffn.time_maa_k, 1.0 - base)
        put(ffn.time_maa_r, 1.0 - base)
        ortho(ffn.key, 1.0)
        ffn.receptance.weight.zero_()
        ffn.value.weight.zero_()

"""Bone (Block Affine) adapters for a frozen nn.Linear, computed without a weight-sized activation.

Torch layout: W is (out, in) and y = x W^T. Cut W into b x b blocks W[a, c]; a indexes the
out/b output blocks, c the in/b input blocks. Every variant starts at zero, so the adapted layer
equals the base layer at step 0, and the adapted weight W' = W + delta is:

    row (paper eq. 9-11), trainable B (in/b, b, b):   W'[a,c] = W[a,c] (I + B_c) + B_c
    col (paper eq. 6-8),  trainable B (out/b, b, b):  W'[a,c] = W[a,c] (I + B_a) + B_a
    ab  (Table 5 ablation), A, B (in/b, b, b) each:   W'[a,c] = W[a,c] (I + A_c) + B_c

Row and ab factorise through the input. With x_c the c-th b-wide slice of x,

    y_a = sum_c x_c W'[a,c]^T = sum_c x~_c W[a,c]^T + s,   x~_c = x_c (I + A_c^T),  s = sum_c x_c B_c^T

so y = F.linear(x~, W) + tile(s, out/b): one base-sized matmul plus O(tokens * in * b) work. The
backward (g = dL/dy, g~ = g W, gs = sum_a g_a) is
    dL/dx_c = g~_c (I + A_c) + gs B_c,  dL/dA_c = g~_c^T x_c,  dL/dB_c = gs^T x_c,  dL/dW = g^T x~,
and for row (A = B) the two B terms add. `_RowAffine` saves only x (plus the parameters).

Col does not factorise (B_a sits inside the sum over c); its B-gradient needs the weight-sized
G = g^T x: dL/dB_a = sum_c W[a,c]^T G[a,c] + G[a,c]. `_ColAffine` builds W' in forward without
saving it, rebuilds it in backward and drops G as soon as dL/dB is formed. Viewing W as
(out/b, b * in/b, b) turns both W[a,:] B_a and W[a,:]^T G[a,:] into one contiguous bmm.

Adapter tensors are float32 parameters whatever the base dtype (so optimiser updates are not
lost to bf16 rounding); the forward casts them to the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .fold import base_weight, fold_into_linear
from .options.bone import BONE_MODES
from .registry import MethodCode


def _blockwise(xv: torch.Tensor, m: torch.Tensor, transpose: bool) -> torch.Tensor:
    """z[n, c] = xv[n, c] @ m[c]^T (transpose) or xv[n, c] @ m[c]; xv (N, C, b), m (C, b, b).

    Returns (C, N, b), the layout the batched matmul writes without a copy."""
    return torch.bmm(xv.transpose(0, 1), m.transpose(1, 2) if transpose else m)


def _cat_blocks(m: torch.Tensor) -> torch.Tensor:
    """(C, b, b) -> (b, C*b) with columns c*b:(c+1)*b = m[c], so x @ out^T = sum_c x_c m_c^T."""
    C, b, _ = m.shape
    return m.permute(1, 0, 2).reshape(b, C * b)


class _RowAffine(torch.autograd.Function):
    """y = F.linear(x~, W) + tile(s); bb is None for Bone-row (A = B shared)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, bb: torch.Tensor | None):
        N, n_in = x.shape                         # x (N, in)
        C, b, _ = a.shape                         # a (in/b, b, b)
        xv = x.view(N, C, b)
        za = _blockwise(xv, a, True)              # (C, N, b): x_c A_c^T
        xt = torch.add(xv, za.transpose(0, 1)).view(N, n_in)    # x~ (N, in)
        s = za.sum(0) if bb is None else x @ _cat_blocks(bb).t()  # (N, b)
        y = F.linear(xt, weight)                  # (N, out)
        y.view(N, -1, b).add_(s.unsqueeze(1))     # + tile(s, out/b)
        ctx.save_for_backward(x, weight, a, bb)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, a, bb = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        N, n_in = x.shape
        C, b, _ = a.shape
        g = g.contiguous()
        xv = x.view(N, C, b)
        gs = g.view(N, -1, b).sum(1)              # (N, b)
        gxt = g @ weight                          # (N, in): the frozen linear's own backward
        gx = ga = gb = gw = None
        if need_w:
            xt = torch.add(xv, _blockwise(xv, a, True).transpose(0, 1)).view(N, n_in)
            gw = g.t() @ xt                       # (out, in)
        if bb is None:                            # row: dz_c = g~_c + gs feeds A_c = B_c
            dz = torch.add(gxt.view(N, C, b), gs.unsqueeze(1))  # (N, C, b)
            if need_a:
                ga = torch.bmm(dz.transpose(0, 1).transpose(1, 2), xv.transpose(0, 1))
            if need_x:                            # in place: g~ is not needed any more
                gx = gxt.view(N, C, b).add_(_blockwise(dz, a, False).transpose(0, 1)).view(N, n_in)
            return gx, gw, ga, None
        gtv = gxt.view(N, C, b)
        if need_a:
            ga = torch.bmm(gtv.transpose(0, 1).transpose(1, 2), xv.transpose(0, 1))
        if need_b:
            gb = (gs.t() @ x).view(b, C, b).permute(1, 0, 2).contiguous()
        if need_x:                                # in place: g~ is not needed any more
            gx = gtv.add_(_blockwise(gtv, a, False).transpose(0, 1)).view(N, n_in)
            gx.addmm_(gs, _cat_blocks(bb))
        return gx, gw, ga, gb


def _col_weight(weight: torch.Tensor, bone: torch.Tensor) -> torch.Tensor:
    """W' = W + delta for Bone-col, as a fresh (out, in) tensor; bone (out/b, b, b)."""
    A, b, _ = bone.shape
    out, n_in = weight.shape
    wv = weight.view(A, -1, b)                            # (out/b, b * in/b, b): rows (i, c)
    w2 = torch.baddbmm(wv, wv, bone)                      # W[a,c] (I + B_a), all c at once
    w2.view(A, b, n_in // b, b).add_(bone.unsqueeze(2))   # + B_a in every block of row a
    return w2.view(out, n_in)


class _ColAffine(torch.autograd.Function):
    """y = x W'^T with W' rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bone: torch.Tensor):
        y = F.linear(x, _col_weight(weight, bone))          # W' freed on return
        ctx.save_for_backward(x, weight, bone)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, bone = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        A, b, _ = bone.shape
        g = g.contiguous()
        gx = gw = gb = None
        if need_x:
            gx = g @ _col_weight(weight, bone)              # (N, in); W' dropped at once
        if need_w or need_b:
            G = g.t() @ x                                   # (out, in) = dL/dW'
            gv = G.view(A, -1, b)                           # (out/b, b * in/b, b)
            if need_b:
                gb = torch.bmm(weight.view(A, -1, b).transpose(1, 2), gv)
                gb += G.view(A, b, -1, b).sum(2)
            if need_w:                                      # dL/dW[a,c] = G[a,c] (I + B_a)^T
                gw = torch.baddbmm(gv, gv, bone.transpose(1, 2)).view_as(G)
            del G, gv
        return gx, gw, gb


def _affine_on_base(base: nn.Module, x: torch.Tensor, a: torch.Tensor, bb: torch.Tensor | None) -> torch.Tensor:
    """Bone-row (bb None) / Bone-AB through a frozen linear module `base` (a QuantLinear, which
    supplies x W^T and g W itself): y = base(x~) + tile(s) in plain autograd; x (N, in)."""
    N, n_in = x.shape
    C, b, _ = a.shape
    xv = x.view(N, C, b)
    za = _blockwise(xv, a, True).transpose(0, 1)          # (N, C, b): x_c A_c^T
    s = za.sum(1) if bb is None else x @ _cat_blocks(bb).t()  # (N, b)
    y = base((xv + za).reshape(N, n_in))                  # the quantised layer on x~
    return (y.view(N, -1, b) + s.unsqueeze(1)).view(N, -1)


def bone_delta(weight: torch.Tensor, bone: torch.Tensor, mode: str = "row",
               bone_b: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit delta (out, in) of one Bone adapter; differentiable, used to merge.

    mode row/col: `bone` is the single trainable tensor; mode ab: `bone` = A, `bone_b` = B."""
    out, n_in = weight.shape
    b = bone.shape[-1]
    wv = weight.reshape(out // b, b, n_in // b, b)        # wv[a, i, c, j] = W[a,c][i, j]
    if mode == "col":
        d = torch.einsum("aicj,ajk->aick", wv, bone) + bone.unsqueeze(2)
    else:
        add = bone if mode == "row" else bone_b
        d = torch.einsum("aicj,cjk->aick", wv, bone) + add.permute(1, 0, 2).unsqueeze(0)
    return d.reshape(out, n_in)


def check_block_size(name: str, out_features: int, in_features: int, b: int) -> None:
    """Every Bone variant cuts W into b x b blocks, so b must divide both dimensions."""
    if b < 1:
        raise UserError(f"Bone block size must be positive, got {b}; choose e.g. --bone_b 64")
    for dim, size in (("in_features", in_features), ("out_features", out_features)):
        if size % b:
            raise UserError(f"Bone block size {b} does not divide {dim}={size} of layer {name}; "
                            f"choose a --bone_b that divides it (e.g. 64, 32 or 16)")


class BoneLinear(nn.Module):
    """A frozen nn.Linear plus a Bone adapter (see the module docstring for the math)."""

    def __init__(self, base: nn.Linear, b: int, mode: str = "row", name: str = "linear"):
        super().__init__()
        if mode not in BONE_MODES:
            raise UserError(f"unknown Bone mode {mode!r}; choose one of {', '.join(BONE_MODES)}")
        check_block_size(name, base.out_features, base.in_features, b)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.b, self.mode = b, mode
        self.weight = base.weight                 # the SAME Parameter: never copied, stays frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        n = (self.out_features if mode == "col" else self.in_features) // b
        kw = dict(device=self.weight.device, dtype=torch.float32)
        if mode == "ab":
            self.bone_a = nn.Parameter(torch.zeros(n, b, b, **kw))
            self.bone_b = nn.Parameter(torch.zeros(n, b, b, **kw))
        else:
            self.bone = nn.Parameter(torch.zeros(n, b, b, **kw))

    def adapter_names(self) -> list[str]:
        return ["bone_a", "bone_b"] if self.mode == "ab" else ["bone"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        dev = x.device.type
        # Under autocast compute in its dtype, as autocast would for a plain linear; the
        # Functions themselves then run with autocast off so backward sees matching dtypes.
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features).to(dt).contiguous()       # (N, in)
        qbase = getattr(self, "qbase", None)      # a QuantLinear (rwkv_bone.quant) or None
        if qbase is not None:
            with torch.autocast(dev, enabled=False):
                if self.mode == "col":            # needs W itself: rebuilt in backward, not kept
                    col = lambda x_, b_: _ColAffine.apply(x_, qbase.dequantize(dt), b_)  # noqa: E731
                    b2 = self.bone.to(dt)
                    y = checkpoint(col, x2, b2, use_reentrant=False) if torch.is_grad_enabled() else col(x2, b2)
                else:
                    a, bb = (self.bone, None) if self.mode == "row" else (self.bone_a, self.bone_b)
                    y = _affine_on_base(qbase, x2, a.to(dt), None if bb is None else bb.to(dt))
            return y.view(*lead, self.out_features)
        w = self.weight.to(dt)
        with torch.autocast(dev, enabled=False):
            if self.mode == "row":
                y = _RowAffine.apply(x2, w, self.bone.to(dt), None)
            elif self.mode == "ab":
                y = _RowAffine.apply(x2, w, self.bone_a.to(dt), self.bone_b.to(dt))
            else:
                y = _ColAffine.apply(x2, w, self.bone.to(dt))
            if self.bias is not None:
                y = y + self.bias.to(dt)
        return y.view(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """delta (out, in) in float32."""
        w = base_weight(self).float()
        if self.mode == "ab":
            return bone_delta(w, self.bone_a.float(), "ab", self.bone_b.float())
        return bone_delta(w, self.bone.float(), self.mode)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + delta, reusing this layer's weight storage."""
        return fold_into_linear(self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, b={self.b}, mode={self.mode}"


# ---- registry code (see registry.py) -------------------------------------------------------------
def check_layer(name: str, out: int, n_in: int, s: dict) -> None:
    check_block_size(name, out, n_in, s["bone_b"])


def build(base: nn.Linear, s: dict, name: str, init_factors=None) -> BoneLinear:
    return BoneLinear(base, s["bone_b"], s["bone_mode"], name=name)


def layer_shapes(s: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    b, mode = s["bone_b"], s["bone_mode"]
    if mode == "col":
        return {"bone": (out // b, b, b)}
    if mode == "ab":
        return {"bone_a": (n_in // b, b, b), "bone_b": (n_in // b, b, b)}
    return {"bone": (n_in // b, b, b)}


def merged(w: torch.Tensor, s: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """W' = W + bone_delta (float32 in, float32 out)."""
    if s["bone_mode"] == "ab":
        return w + bone_delta(w, t["bone_a"], "ab", t["bone_b"])
    return w + bone_delta(w, t["bone"], s["bone_mode"])


CODE = MethodCode(BoneLinear, build, check_layer, layer_shapes, ("bone", "bone_a", "bone_b"), merged)

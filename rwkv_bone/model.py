"""RWKV-6 ("x060", Finch) as one readable nn.Module whose state_dict is the official checkpoint layout.

    x = ln0(emb(idx));  per block: x = x + att(ln1(x));  x = x + ffn(ln2(x));  logits = head(ln_out(x))

TimeMix (att), with shift(x)_t = x_{t-1} (zeros, or the carried state, before the first token):
    xx = shift(x) - x;  m = tanh((x + xx*maa_x) @ maa_w1) @_group maa_w2      (5 groups: w, k, v, r, g)
    x_j = x + xx*(maa_j + m_j);  r, k, v = R x_r, K x_k, V x_v;  g = silu(G x_g)
    w_raw = time_decay + tanh(x_w @ decay_w1) @ decay_w2   (per-channel decay exp(-exp(w_raw)))
    out = O (GroupNorm_H(WKV(r, k, v, w_raw, u=time_faaaa)) * g)
ChannelMix (ffn): out = sigmoid(R (x + xx*maa_r)) * V relu(K (x + xx*maa_k))^2

State tuning (rwkv_bone/peft/state.py) adds `att.time_state` (H, N, N) per block (the official
file layout: time_state[h, j, i] = S_0[h, i, j]); the WKV then starts from it instead of zeros
whenever no state is passed, for every sequence of the batch.

Linear layers are only ever called as modules, so an adapter that replaces an nn.Linear works as is.
The WKV op is `rwkv_bone.wkv.wkv6` (looked up as this module's global at call time); it always
runs in float32 for bf16/fp16/fp32 models (as the reference inference code does), float64 for
float64 models (tests).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import gemv
from .config import RWKV6Config
from .errors import UserError
from .wkv import wkv6

LN_EPS = 1e-5
LN_X_EPS = 64e-5  # 1e-5 * head_size_divisor**2 with divisor 8, as in the reference

# Per layer: (att token-shift x (B, C), wkv state (B, H, N, N) in float32 (float64 for a float64
# model), ffn token-shift x (B, C)).
LayerState = tuple[Tensor, Tensor, Tensor]


def _shift(x: Tensor, prev: Optional[Tensor], doc_start: Optional[Tensor] = None) -> Tensor:
    """shift(x)_t = x_{t-1}; x (B, T, C), prev (B, C) or None (zeros); zeros at the tokens marked
    in doc_start (B, T) bool (a packed document's first token sees nothing before it)."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev.to(x.dtype).unsqueeze(1)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if doc_start is not None:
        shifted = shifted.masked_fill(doc_start.unsqueeze(-1), 0.0)
    return shifted


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
        self.n_head, self.head_size, self.dim_maa = H, N, cfg.dim_maa
        self.wkv_backend = cfg.wkv_backend
        # Registration order follows the reference implementation (checkpoint key order).
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.dim_maa))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.dim_maa, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, cfg.dim_decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(cfg.dim_decay, A))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=LN_X_EPS)
        self.register_parameter("time_state", None)  # (H, N, N) learned S_0, only with state tuning

    def initial_wkv_state(self, batch_size: int, dtype: torch.dtype) -> Optional[Tensor]:
        """The learned S_0 (B, H, N, N) (rows = key channel) broadcast over the batch, or None."""
        if self.time_state is None:
            return None
        s0 = self.time_state.to(dtype).transpose(1, 2)  # file layout (H, value, key) -> (H, key, value)
        return s0.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()

    def forward(self, x: Tensor, shift_state: Optional[Tensor], wkv_state: Optional[Tensor],
                doc_start: Optional[Tensor] = None):
        """x (B, T, C) -> out (B, T, C), last x (B, C), wkv state (B, H, N, N) (float32 or wider).
        doc_start (B, T) bool: both states restart from zero at each marked token."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shift(x, shift_state, doc_start) - x  # (B, T, C)
        xxx = x + xx * self.time_maa_x
        m = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, self.dim_maa).transpose(0, 1)  # (5, BT, Dm)
        m = torch.bmm(m, self.time_maa_w2).view(5, B, T, C)
        mw, mk, mv, mr, mg = m.unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)  # (B, T, A)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # WKV and the decay (exponentiated twice, so sensitive to rounding) run in at least float32.
        wdt = torch.promote_types(x.dtype, torch.float32)
        w = self.time_decay.to(wdt) + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).to(wdt)

        heads = lambda t: t.to(wdt).reshape(B, T, H, N)  # noqa: E731
        if wkv_state is None:
            wkv_state = self.initial_wkv_state(B, wdt)
        # Autocast off: the op gets exactly the precision chosen here, whatever its implementation.
        with torch.autocast(device_type=x.device.type, enabled=False):
            args = (heads(r), heads(k), heads(v), heads(w), self.time_faaaa.to(wdt), wkv_state)
            # Only non-default options are passed (stand-in ops in tests take the six tensors alone).
            opts = {} if doc_start is None else {"doc_start": doc_start}
            if self.wkv_backend != "auto":
                opts["backend"] = self.wkv_backend
            y, wkv_state = wkv6(*args, **opts)
            y = y.reshape(B * T, H * N)  # (BT, A) in wdt
            y = F.group_norm(y, H, self.ln_x.weight.to(wdt), self.ln_x.bias.to(wdt), LN_X_EPS)
        y = y.view(B, T, H * N).to(x.dtype) * g
        return self.output(y), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, shift_state: Optional[Tensor], doc_start: Optional[Tensor] = None):
        """x (B, T, C) -> out (B, T, C), last x (B, C)."""
        xx = _shift(x, shift_state, doc_start) - x
        xk = x + xx * self.time_maa_k
        xr = x + xx * self.time_maa_r
        kv = self.value(torch.relu(self.key(xk)) ** 2)
        return torch.sigmoid(self.receptance(xr)) * kv, x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: Tensor, att_x: Optional[Tensor], wkv: Optional[Tensor], ffn_x: Optional[Tensor],
                doc_start: Optional[Tensor] = None):
        """x (B, T, C) -> x (B, T, C), new (att_x, wkv, ffn_x) state."""
        if self.layer_id == 0:
            x = self.ln0(x)
        a, att_x, wkv = self.att(self.ln1(x), att_x, wkv, doc_start)
        x = x + a
        f, ffn_x = self.ffn(self.ln2(x), ffn_x, doc_start)
        return x + f, att_x, wkv, ffn_x


class RWKV6(nn.Module):
    def __init__(self, config: RWKV6Config) -> None:
        super().__init__()
        self.config = config
        self.grad_cp = False
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, idx: Tensor, doc_start: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) LongTensor -> logits (B, T, V) float32 (float64 for a float64 model).
        doc_start (B, T) bool (packed samples): True at the first token of each document; every
        document then gives the logits it would give alone."""
        return self.forward_with_state(idx, None, doc_start)[0]

    def forward_with_state(
        self, idx: Tensor, state: Optional[list[LayerState]] = None, doc_start: Optional[Tensor] = None
    ) -> tuple[Tensor, list[LayerState]]:
        """Process idx (B, T) continuing from `state` (None = start of text); returns the state after
        the last token, so feeding a sequence in pieces gives the same logits as feeding it whole.
        Where doc_start (B, T) bool is True every state restarts from zero (the given state is
        dropped for rows marked at t = 0)."""
        h, new_state = self.forward_features(idx, state, doc_start)
        logits = self.head(h)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return logits, new_state

    def forward_features(
        self, idx: Tensor, state: Optional[list[LayerState]] = None, doc_start: Optional[Tensor] = None
    ) -> tuple[Tensor, list[LayerState]]:
        """As forward_with_state, but returns the hidden states ln_out(x) (B, T, C) that the head
        maps to logits (the chunked loss applies the head itself, a chunk at a time)."""
        if idx.dim() != 2:
            raise UserError(f"token ids must have shape (batch, time), got {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise UserError("cannot run the model on an empty sequence; pass at least one token")
        if state is not None and len(state) != len(self.blocks):
            raise UserError(f"the state holds {len(state)} layers but the model has {len(self.blocks)}")
        if doc_start is not None and (doc_start.shape != idx.shape or doc_start.dtype != torch.bool):
            raise UserError(f"doc_start must be a bool tensor shaped like the token ids {tuple(idx.shape)}, got "
                            f"{doc_start.dtype} {tuple(doc_start.shape)}")
        x = self.emb(idx)  # (B, T, C)
        new_state: list[LayerState] = []
        use_cp = self.grad_cp and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            att_x, wkv, ffn_x = (None, None, None) if state is None else state[i]
            if use_cp:
                x, att_x, wkv, ffn_x = checkpoint(block, x, att_x, wkv, ffn_x, doc_start, use_reentrant=False)
            else:
                x, att_x, wkv, ffn_x = block(x, att_x, wkv, ffn_x, doc_start)
            new_state.append((att_x, wkv, ffn_x))
        return self.ln_out(x), new_state

    def zero_state(self, batch_size: int) -> list[LayerState]:
        """The state before any token (equivalent to passing state=None): zeros, except the WKV
        state of a model with a learned initial state (state tuning), which is that state."""
        c = self.config
        p = self.emb.weight
        wdt = torch.promote_types(p.dtype, torch.float32)
        out = []
        for block in self.blocks:
            wkv = block.att.initial_wkv_state(batch_size, wdt)
            if wkv is None:
                wkv = torch.zeros(batch_size, c.n_head, c.head_size, c.head_size, device=p.device, dtype=wdt)
            out.append((p.new_zeros(batch_size, c.n_embd), wkv.detach().clone(), p.new_zeros(batch_size, c.n_embd)))
        return out

    def add_time_state(self, values: Optional[dict[str, Tensor]] = None) -> list[str]:
        """Give every block a learned initial WKV state `att.time_state` (H, N, N) in the official
        file layout, float32, zeros unless `values` ({key: tensor}) holds it; returns the keys."""
        c = self.config
        names = []
        for i, block in enumerate(self.blocks):
            key = f"blocks.{i}.att.time_state"
            if block.att.time_state is None:
                dev = block.att.time_faaaa.device
                init = torch.zeros(c.n_head, c.head_size, c.head_size, device=dev, dtype=torch.float32)
                block.att.time_state = nn.Parameter(init)
            if values is not None and key in values:
                with torch.no_grad():
                    block.att.time_state.copy_(values[key])
            names.append(key)
        return names

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: RWKV6Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "RWKV6":
        """A model with the reference initialisation (nothing allocated when device is "meta")."""
        with torch.device("meta"):
            model = cls(config)
        if torch.device(device).type == "meta":
            return model.to(dtype)
        model = model.to_empty(device=device)
        model.init_weights()
        return model.to(dtype)

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device = "meta", **overrides) -> "RWKV6":
        """A released architecture ("1.6b", "3b", "7b", "14b"); on "meta" for counting and planning."""
        return cls.from_config(RWKV6Config.preset(name, **overrides), device=device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dtype: Optional[torch.dtype] = torch.float32,
        device: str | torch.device = "cpu",
        allow_extra_keys: bool = False,
    ) -> "RWKV6":
        """Load an official RWKV-6 .pth; every dimension comes from the tensor shapes.
        dtype None keeps the checkpoint's dtype. Extra keys are refused unless allow_extra_keys
        (then they are ignored)."""
        from .checkpoint import load_state_dict

        return cls.from_state_dict(load_state_dict(path, allow_extra_keys=allow_extra_keys), dtype, device)

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, Tensor],
        dtype: Optional[torch.dtype] = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "RWKV6":
        """A model holding `sd` (official layout, prefixes already stripped, e.g. by
        rwkv_bone.checkpoint.load_state_dict); dims from its shapes, dtype None keeps each tensor's."""
        config = RWKV6Config.from_state_dict(sd)
        with torch.device("meta"):
            model = cls(config)
        states = {k: v for k, v in sd.items() if k.endswith(".att.time_state")}
        expected = model.state_dict().keys()
        sd = {k: sd[k].to(device=device, dtype=dtype if dtype is not None else sd[k].dtype) for k in expected}
        model.load_state_dict(sd, assign=True)
        if states:  # a merged state-tuning file: the learned initial states (kept float32)
            model.add_time_state(states)
        return model

    def init_weights(self) -> None:
        """The reference initialisation for training from scratch (see rwkv_bone.init)."""
        from .init import init_rwkv6_

        init_rwkv6_(self)

    # ---- saving ----------------------------------------------------------------------------
    def official_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
        """The state dict in the official layout, on CPU, contiguous, optionally cast."""
        sd = self.state_dict()
        expected = self.config.expected_shapes()
        if self.blocks[0].att.time_state is not None:  # learned initial states: official keys too
            expected.update(self.config.state_shapes())
        extra = [k for k in sd if k not in expected]
        if extra:
            raise UserError(
                f"the model holds tensors outside the RWKV-6 layout (e.g. {extra[0]}); merge the "
                "adapters first (merge_peft) or save them separately with save_adapter"
            )
        out = {}
        for k in expected:
            t = sd[k].detach()
            if t.is_meta:
                raise UserError("this model lives on the meta device and has no weights to save; load or initialise it first")
            t = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger buffer: torch.save would write the whole buffer
            out[k] = t
        return out

    def save_checkpoint(self, path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> None:
        """Write an official-layout .pth (loadable by the `rwkv` package), atomically."""
        from .atomic import check_writable_dir, torch_save_atomic

        check_writable_dir(path, "checkpoint")
        torch_save_atomic(self.official_state_dict(dtype), path)

    # ---- one-token inference step -----------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """Advance every row of `state` by one token: tokens (B,) int64 -> logits (B, V) float32
        (float64 for a float64 model) and the new state. The same arithmetic as forward_with_state
        at T = 1, written as plain per-head matrix ops (no token shift concat, no chunked WKV), which
        is what makes greedy decoding cheap. Self-contained on purpose: it reads only the modules'
        weights, so it keeps working whatever else forward_with_state grows."""
        x = self.emb(tokens)  # (B, C)
        new_state: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            att_x, wkv, ffn_x = state[i]
            if i == 0:
                x = block.ln0(x)
            a, att_x, wkv = _time_mix_step(block.att, block.ln1(x), att_x, wkv)
            x = x + a
            f, ffn_x = _channel_mix_step(block.ffn, block.ln2(x), ffn_x)
            x = x + f
            new_state.append((att_x, wkv, ffn_x))
        logits = _step_linear(self.head, self.ln_out(x))
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return logits, new_state


STEP_BLOCK_ROWS = 32  # output rows per block of the batched float32 step product (see _step_linear)


def _step_linear(lin: nn.Module, x: Tensor) -> Tensor:
    """lin(x) for x (B, in). A plain bias-free CPU nn.Linear with up to gemv.MAX_ROWS rows in fp32 or
    bf16 goes through the few-row kernel of rwkv_bone/gemv where it runs. Otherwise (no kernel, more
    rows) a plain float32 nn.Linear with 3 or more rows and a wide output is computed
    as one bmm over blocks of STEP_BLOCK_ROWS weight rows: at a few rows the (B, in) x (in, out)
    product is bound by reading the weight once, but MKL's sgemm for small B runs at about a third
    of that bandwidth (B = 8, C = 2048: ~11 GB/s, against ~29 GB/s at B <= 2; bench/bench_eval.py),
    while the blocked bmm streams the same bytes at ~17-21 GB/s (32-row blocks: 5-13% faster than 64 on
    the 2048x2048, 7168x2048, 2048x7168 and 65536x2048 weights, 128 and 256 slower). Same products and sums (the tests
    compare it with lin(x)); anything else (an adapter, bf16, batch 1 or 2) is just lin(x)."""
    w = lin.weight if type(lin) is nn.Linear else None
    y = gemv.try_linear(x, w) if w is not None and lin.bias is None else None
    if y is not None:
        return y  # the few-row CPU kernel: fp32 or bf16, B <= 16 (rwkv_bone/gemv)
    if (w is None or lin.bias is not None or x.dim() != 2 or x.shape[0] < 3 or x.dtype != torch.float32
            or w.dtype != torch.float32 or w.shape[0] < 16 * STEP_BLOCK_ROWS or w.shape[0] % STEP_BLOCK_ROWS
            or not w.is_contiguous()):
        return lin(x)
    B, K = x.shape
    n = w.shape[0] // STEP_BLOCK_ROWS
    blocks = w.view(n, STEP_BLOCK_ROWS, K).transpose(1, 2)  # (n, in, rows) views, no copy
    return torch.bmm(x.expand(n, B, K), blocks).transpose(0, 1).reshape(B, -1)  # (B, out)


def _step_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x (B, K) @ w (K, N): the panel kernel of rwkv_bone/gemv for float32 on the CPU (these small
    weights come at a few GB/s through torch's sgemm at few rows), torch's matmul otherwise."""
    y = gemv.try_matmul(x, w)
    return x @ w if y is None else y


def _time_mix_step(att: TimeMix, x: Tensor, prev: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TimeMix for one token: x, prev (B, C), S (B, H, N, N) -> out (B, C), x, new S. With
    d = exp(-exp(w)): y = r (S + diag(u) k^T v) = r S + (r . u . k) v, S' = diag(d) S + k^T v."""
    B, C = x.shape
    H, N = att.n_head, att.head_size
    xx = prev.to(x.dtype) - x
    m = torch.tanh(_step_matmul(x + xx * att.time_maa_x[0], att.time_maa_w1)).view(B, 5, att.dim_maa)
    mw, mk, mv, mr, mg = (_step_matmul(m[:, i], att.time_maa_w2[i]) for i in range(5))  # 5 x (B, C)
    xw = x + xx * (att.time_maa_w[0] + mw)
    r = _step_linear(att.receptance, x + xx * (att.time_maa_r[0] + mr))  # (B, A)
    k = _step_linear(att.key, x + xx * (att.time_maa_k[0] + mk))
    v = _step_linear(att.value, x + xx * (att.time_maa_v[0] + mv))
    g = F.silu(_step_linear(att.gate, x + xx * (att.time_maa_g[0] + mg)))
    wdt = S.dtype  # float32 (float64 for a float64 model), as in forward
    w = att.time_decay[0].to(wdt) + _step_matmul(torch.tanh(_step_matmul(xw, att.time_decay_w1)),
                                                 att.time_decay_w2).to(wdt)
    d = torch.exp(-torch.exp(w)).view(B, H, N)
    r, k, v = (t.to(wdt).view(B, H, N) for t in (r, k, v))
    u = att.time_faaaa.to(wdt)  # (H, N)
    y, S = gemv.wkv_step(S, r, k, v, d, u)  # y (B, H, N); the C kernel for float32 on CPU
    y = F.group_norm(y.reshape(B, H * N), H, att.ln_x.weight.to(wdt), att.ln_x.bias.to(wdt), LN_X_EPS)
    return _step_linear(att.output, y.to(x.dtype) * g), x, S


def _channel_mix_step(ffn: ChannelMix, x: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
    """ChannelMix for one token: x, prev (B, C) -> out (B, C), x."""
    xx = prev.to(x.dtype) - x
    kv = _step_linear(ffn.value, torch.relu(_step_linear(ffn.key, x + xx * ffn.time_maa_k[0])) ** 2)
    return torch.sigmoid(_step_linear(ffn.receptance, x + xx * ffn.time_maa_r[0])) * kv, x

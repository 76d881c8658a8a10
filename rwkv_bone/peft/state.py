"""State tuning: train only the initial WKV state of every layer (RWKV-PEFT's `--peft state`).

Each TimeMix's WKV recurrence (rwkv_bone/wkv) runs, per head, with S (N x N, rows = key channel)

    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(d_t) S_{t-1} + k_t^T v_t

from S_0 = 0 in a plain model. State tuning makes S_0 a trained parameter per layer, the same for
every sequence of the batch; nothing else changes (no extra work per token). The parameter is
`blocks.{i}.att.time_state`, shape (H, N, N), stored in the layout of the files RWKV-PEFT writes
and the official `rwkv` package reads, time_state[h, j, i] = S_0[h, i, j] (value channel first:
the package transposes it on load), so an adapter file, a merged model file and the parameter
hold the same numbers. It starts at zero (the adapted model equals the base at step 0) and is
float32 whatever the base dtype. dL/dS_0 comes from the WKV op itself (every path is
differentiable in its initial state).

States want a far larger learning rate than adapters: the README gives the measured default.
Merging writes base + these keys (a model file that the official package starts from this state);
the model starts from it whenever no state is passed (RWKV6.forward, zero_state).
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from .registry import MethodCode

STATE_KEY_RE = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def apply_model(model: nn.Module, s: dict) -> list[str]:
    """Give every layer a trainable time_state (H, N, N) (zeros, or the one a merged file already
    holds); returns the parameter names."""
    names = model.add_time_state()
    for name in names:
        model.get_parameter(name).requires_grad_(True)
    return names


def check_layer(name: str, out: int, n_in: int, s: dict) -> None:
    return None


def layer_shapes(s: dict, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {}                                     # no per-linear tensors: the state is per layer


def merged(w: Tensor, s: dict, t: dict[str, Tensor]) -> Tensor:
    return w


CODE = MethodCode(None, None, check_layer, layer_shapes, (), merged, apply_model)

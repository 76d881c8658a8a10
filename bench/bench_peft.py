"""Forward+backward time and saved activation memory of one adapted linear layer, side by side.

    python bench/bench_peft.py [--tokens 2048] [--shapes 2048x2048,7168x2048,8960x2560] [--b 64]
                               [--threads 1] [--reps 3] [--dtype fp32|bf16] [--device cpu|cuda]

Variants: the frozen linear alone (its own forward + input-gradient backward: the floor every
adapter builds on, "x frozen" column), Bone-row factorised (ours), Bone-row explicit (W' = W + delta materialised every step,
as the paper and its peers do), Bone-col, Bone-ab, LoRA r = b/2 (same trainable count as
Bone-row on square layers), PiSSA r = b/2, MiSS r = b (ours; same trainable count as Bone-row
on every layer of RWKV-6), and HF peft's Bone "bat" and MiSS when `peft` is installed.
Shapes are (out x in). "saved" is the bytes autograd keeps for backward (unique storages, not
counting parameters), measured with torch.autograd.graph.saved_tensors_hooks.
Time is the best of --reps interleaved runs; on CPU with one thread (the default) it is the
thread's CPU time, so other jobs on a shared machine barely disturb the comparison.
Flop count per token of the adapter part, fwd+bwd: LoRA 3 r (in + out), Bone-row 3 in b, so at
r = b/2 they are equal on square layers and Bone-row does less on out > in layers; MiSS 3 r out
plus the slice sums (no weight-sized work).
Goals: Bone-row <= 0.95x LoRA time with no more saved memory; Bone-col <= 1.6x LoRA time with
saved memory within 1.1x LoRA's; Bone-row within 1.05x of the frozen linear (its FLOP floor is
1 + 3b / (2 out): 1.047 at 2048x2048, 1.013 at 7168x2048, 1.047 at 2048x7168).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_bone.peft import BoneLinear, LoraLinear, MissLinear, bone_delta


class ExplicitBoneRow(nn.Module):
    """The straightforward Bone-row: build W' = W + delta with autograd, then one linear."""

    def __init__(self, base: nn.Linear, b: int):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bone = nn.Parameter(torch.zeros(base.in_features // b, b, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w + bone_delta(w, self.bone.to(w.dtype), "row"))


def hf_peft_bat(base: nn.Linear, b: int) -> nn.Module | None:
    """HF peft's Bone in "bat" mode, or None when peft (or its Bone) is not installed."""
    try:
        from peft import BoneConfig, get_peft_model
    except ImportError:
        return None
    wrapper = nn.Sequential(base)
    model = get_peft_model(wrapper, BoneConfig(r=b, init_weights="bat", target_modules=["0"]))
    return model


def hf_peft_miss(base: nn.Linear, r: int) -> nn.Module | None:
    """HF peft's default MiSS, or None when peft (or its MiSS) is not installed."""
    try:
        from peft import MissConfig, get_peft_model
    except ImportError:
        return None
    return get_peft_model(nn.Sequential(base), MissConfig(r=r, target_modules=["0"]))


def make_variants(out: int, n_in: int, b: int, dtype: torch.dtype) -> dict[str, nn.Module]:
    def base() -> nn.Linear:
        lin = nn.Linear(n_in, out, bias=False).to(dtype)
        nn.init.normal_(lin.weight, 0, n_in ** -0.5)
        return lin

    frozen = base()
    frozen.weight.requires_grad_(False)
    v = {
        "frozen linear": frozen,
        "lora r=b/2": LoraLinear(base(), b // 2),
        "pissa r=b/2": LoraLinear(base(), b // 2, init="pissa", niter=2),
        "bone-row": BoneLinear(base(), b, "row"),
        "bone-row explicit": ExplicitBoneRow(base(), b),
        "bone-col": BoneLinear(base(), b, "col"),
        "bone-ab": BoneLinear(base(), b, "ab"),
        "miss r=b": MissLinear(base(), b),
    }
    hf = hf_peft_bat(base(), b)
    if hf is not None:
        v["hf-peft bat"] = hf
    hf = hf_peft_miss(base(), b)
    if hf is not None:
        v["hf-peft miss"] = hf
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in v.values():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return v


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(seen.values())


def step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    y = module(x)
    y.backward(gy)
    if gy.is_cuda:
        torch.cuda.synchronize()
    for p in module.parameters():
        p.grad = None
    x.grad = None


def bench_shape(out: int, n_in: int, tokens: int, b: int, reps: int, dtype: torch.dtype,
                clock=time.perf_counter) -> list[tuple]:
    variants = make_variants(out, n_in, b, dtype)
    x = torch.randn(tokens, n_in, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, out, dtype=dtype)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():                              # warm-up
        step(m, x, gy)
    for _ in range(reps):                                    # interleaved: load noise hits all alike
        for k, m in variants.items():
            t0 = clock()
            step(m, x, gy)
            times[k].append(clock() - t0)
    rows = []
    lora_t = min(times["lora r=b/2"])          # best of reps: the other jobs on the machine only add
    lora_m = saved_bytes(variants["lora r=b/2"], x)
    frozen_t = min(times["frozen linear"])
    for k, m in variants.items():
        t = min(times[k])
        mem = saved_bytes(m, x)
        rows.append((f"{out}x{n_in}", k, t * 1e3, t / lora_t, mem / 2**20, mem / lora_m, t / frozen_t))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch * ctx_len)")
    p.add_argument("--shapes", default="2048x2048,7168x2048,8960x2560", help="out x in, comma separated")
    p.add_argument("--b", type=int, default=64, help="Bone block size (LoRA/PiSSA use r = b/2)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (the best is reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; with 1 (default) the clock is the thread's CPU time, "
                        "which other jobs on a shared machine hardly disturb; else wall time")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.set_default_device(args.device)
    on_cpu = torch.device(args.device).type == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
    cpu_clock = on_cpu and args.threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, "
          f"b={args.b}, {args.dtype}, {args.device}, best of {args.reps}, "
          f"{'thread CPU time' if cpu_clock else 'wall time'}")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("(HF peft not installed: its Bone 'bat' row skipped)")
    print(f"{'shape':>10} {'variant':<18} {'fwd+bwd ms':>10} {'x LoRA':>7} {'saved MiB':>9} {'x LoRA':>7} "
          f"{'x frozen':>8}")
    for shape in args.shapes.split(","):
        out, n_in = (int(s) for s in shape.lower().split("x"))
        for row in bench_shape(out, n_in, args.tokens, args.b, args.reps, dtype, clock):
            print(f"{row[0]:>10} {row[1]:<18} {row[2]:10.1f} {row[3]:7.2f} {row[4]:9.1f} {row[5]:7.2f} "
                  f"{row[6]:8.2f}")


if __name__ == "__main__":
    main()

"""Per-GPU memory plan for a training run, from DeepSpeed's own estimators plus measured activations.

    python bench/memory_plan.py --model_preset 1.6b --peft bone --bone_b 64 --micro_bsz 8 \
        --ctx_len 512 --strategy deepspeed_stage_2 --devices 1 --grad_cp 1

Per GPU (bf16 training, as configs/rwkv6-*.sh run it):
- model states of the trainable part: DeepSpeed's `estimate_zero2_model_states_mem_needs`
  (ZeRO 1 and 2; ZeRO-1 adds the unsharded 16-bit gradients, 2 bytes/param) or
  `estimate_zero3_model_states_mem_needs` (ZeRO 3), with the run's trainable parameter count;
- the frozen part: its bf16 bytes (2/param) on every GPU, sharded over the GPUs under ZeRO-3;
- activations: the bytes autograd saves for backward, MEASURED with
  `torch.autograd.graph.saved_tensors_hooks` on the real dimensions (C, H, F, V of the preset) with a
  two-layer model on the CPU, block by block: total = outside-blocks + n_layer x one block. The WKV op
  is replaced by a stand-in that saves what the CUDA kernel saves (r, k, v, w, u, s0), since the CPU
  chunked path keeps other tensors. Saved frozen weights are not counted twice. With --grad_cp 1 the
  blocks keep only their inputs; one block's saved tensors exist again during its recompute;
- the fused cross-entropy's working set (train.py's default for a plain head): three fp32 (chunk, V) buffers and
  two bf16 transients of one token chunk, alive in forward only; what it saves (dL/dh) is measured.
Not included: the CUDA context, allocator fragmentation and other transient buffers (scripts/gpu_check.sh
compares the sum with torch.cuda.max_memory_allocated when a GPU is lent).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

GIB = 1024 ** 3
STAGES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_preset", default="1.6b", choices=("1.6b", "3b", "7b", "14b"))
    p.add_argument("--peft", default="bone", help="adapter method as in train.py (none = full fine-tuning)")
    p.add_argument("--bone_b", type=int, default=64)
    p.add_argument("--bone_mode", default="row")
    p.add_argument("--lora_r", type=int, default=32)
    p.add_argument("--micro_bsz", type=int, default=8)
    p.add_argument("--ctx_len", type=int, default=512)
    p.add_argument("--strategy", default="deepspeed_stage_2", choices=tuple(STAGES))
    p.add_argument("--devices", type=int, default=1, help="GPUs in all (ZeRO shards over them)")
    p.add_argument("--grad_cp", type=int, default=1, choices=(0, 1))
    p.add_argument("--measure_bsz", type=int, default=1,
                   help="micro-batch of the measuring forward on the CPU (saved bytes scale linearly in it; "
                        "the micro_bsz figure is scaled from it, checked by --check_linear)")
    p.add_argument("--check_linear", action="store_true", help="also measure at 2x --measure_bsz and report the ratio")
    p.add_argument("--table", action="store_true", help="print the README table for 1.6b/3b/7b x grad_cp 0/1")
    p.add_argument("--measured", metavar="METRICS_CSV",
                   help="a train.py run's metrics.csv with the same settings: report its peak (peak_mem_mb, "
                        "torch.cuda.max_memory_allocated on a GPU) beside the plan (scripts/gpu_check.sh does this)")
    return p.parse_args(argv)


def measured_peak_bytes(path: str) -> int:
    """The largest peak_mem_mb of a train.py metrics.csv, in bytes (train.py writes the device's
    torch.cuda.max_memory_allocated there on a GPU, the process's peak RSS on the CPU)."""
    import csv

    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "peak_mem_mb" not in (reader.fieldnames or ()):
                raise KeyError("peak_mem_mb")
            values = [float(r["peak_mem_mb"]) for r in reader if r.get("peak_mem_mb")]
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not a train.py metrics.csv (no numeric peak_mem_mb column)") from None
    if not values:
        raise ValueError(f"{path} has no training steps (no peak_mem_mb row)")
    return int(max(values) * 2 ** 20)


class KernelLikeWKV(torch.autograd.Function):
    """Forward through the chunked path; saves exactly what rwkv_bone.wkv.cuda.WKV6CUDA saves."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0):
        from rwkv_bone.wkv import wkv6_chunked

        ctx.save_for_backward(r, k, v, w.float(), u.float(), s0)
        with torch.no_grad():
            return wkv6_chunked(r, k, v, w, u, s0)

    @staticmethod
    def backward(ctx, *grads):  # never called: the plan only measures what forward saves
        raise NotImplementedError


def kernel_like_wkv6(r, k, v, w, u, state=None, doc_start=None):
    B, T, H, N = r.shape
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.float()
    return KernelLikeWKV.apply(r, k, v, w, u, s0)


def build(preset: str, a: argparse.Namespace, n_layer: int):
    import dataclasses

    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft

    config = dataclasses.replace(RWKV6Config.preset(preset), n_layer=n_layer)
    torch.manual_seed(0)
    # Values do not change what autograd saves: allocate without the reference init, fill at random.
    model = RWKV6.from_config(config, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if a.peft != "none":
        apply_peft(model, a.peft, **peft_options(a))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for p in model.parameters():  # what trains stays fp32, frozen weights bf16 (train/run.py)
        p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    return model, config


def peft_options(a: argparse.Namespace) -> dict:
    if a.peft == "bone":
        return {"bone_b": a.bone_b, "bone_mode": a.bone_mode}
    if a.peft in ("lora", "pissa", "olora"):
        return {"lora_r": a.lora_r}
    return {}


def measure_activations(a: argparse.Namespace, bsz: int) -> dict:
    """Saved-for-backward bytes of a two-layer model at the preset's width: {'block', 'outside',
    'block_input', 'ce_chunk'} in bytes for micro-batch `bsz`."""
    import rwkv_bone.model as M
    from rwkv_bone.train.loss import chunk_size, fused_token_loss, uses_fused_loss

    model, config = build(a.model_preset, a, n_layer=2)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    where = {"name": "outside"}
    tally = {"outside": 0, "block0": 0, "block1": 0}
    inputs_kept = {}

    def pack(t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.untyped_storage().nbytes())
        if ptr not in params and key not in seen and t.device.type != "meta":
            seen.add(key)
            tally[where["name"]] += t.untyped_storage().nbytes()
        return t

    def enter(i):
        def hook(module, inputs):
            where["name"] = f"block{i}"
            # what a checkpointed block keeps: its tensor inputs (the residual stream x, states)
            inputs_kept[i] = sum(t.untyped_storage().nbytes() for t in inputs if isinstance(t, Tensor))
        return hook

    def leave(module, inputs, output):
        where["name"] = "outside"

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(enter(i))
        block.register_forward_hook(leave)
    x = torch.randint(0, config.vocab_size, (bsz, a.ctx_len))
    y = torch.randint(0, config.vocab_size, (bsz, a.ctx_len))
    real_wkv = M.wkv6
    M.wkv6 = kernel_like_wkv6
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = model.forward_features(x, None, None)
            assert uses_fused_loss(model.head)  # train.py's default loss for a plain head, as here
            fused_token_loss(model.head.weight, h, y, None)  # saves dL/dh (N, C) for backward
    finally:
        M.wkv6 = real_wkv
    tokens_chunk = min(chunk_size(config.vocab_size), bsz * a.ctx_len)
    # the fused loss's working set, alive during forward only: three (chunk, V) fp32 buffers (logits,
    # log-softmax, gradient) and two bf16 transients (the product before its copy, the gradient cast)
    return {"block": tally["block1"], "outside": tally["outside"],
            "block_input": inputs_kept[1],
            "ce_chunk": tokens_chunk * config.vocab_size * (3 * 4 + 2 * 2)}


def model_states(a: argparse.Namespace) -> dict:
    """Bytes per GPU of the trainable part (DeepSpeed's estimators) and of the frozen part."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from rwkv_bone.config import RWKV6Config
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import count_trainable

    config = RWKV6Config.preset(a.model_preset)
    total = sum(p.numel() for p in RWKV6.from_config(config, device="meta").parameters())
    trainable = total if a.peft == "none" else count_trainable(config, a.peft, (), **peft_options(a))
    base_frozen = 0 if a.peft == "none" else total
    stage, gpus = STAGES[a.strategy], a.devices
    if stage == 3:
        largest = config.vocab_size * config.n_embd
        _, trained = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=gpus,
                                                           cpu_offload=False, cpu_offload_params=False)
        frozen = 2 * base_frozen // gpus
    else:
        _, trained = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
        if stage == 1:
            trained += 2 * trainable - int(2 * trainable / gpus)  # 16-bit gradients are not sharded
        frozen = 2 * base_frozen
    return {"trainable_params": trainable, "total_params": total, "trained": trained, "frozen": frozen}


def plan(a: argparse.Namespace) -> dict:
    act = measure_activations(a, a.measure_bsz)
    scale = a.micro_bsz / a.measure_bsz
    from rwkv_bone.config import RWKV6Config

    L = RWKV6Config.preset(a.model_preset).n_layer  # the measuring model has two; the plan has all
    if a.grad_cp:
        saved = act["outside"] + L * act["block_input"] + act["block"]
    else:
        saved = act["outside"] + L * act["block"]
    activations = int(saved * scale)
    ce = act["ce_chunk"]
    states = model_states(a)
    out = dict(states, activations=activations, ce_chunk=ce, block=int(act["block"] * scale))
    out["total"] = states["trained"] + states["frozen"] + activations + ce
    if a.check_linear:
        act2 = measure_activations(a, 2 * a.measure_bsz)
        out["linearity"] = (act2["block"] + act2["outside"]) / max(1, act["block"] + act["outside"])
    return out


def row(a: argparse.Namespace, r: dict) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    return (f"| {a.model_preset} | {a.peft} | {a.strategy} x{a.devices} | {a.micro_bsz} | {a.ctx_len} | {a.grad_cp} "
            f"| {g(r['frozen'])} | {g(r['trained'])} | {g(r['activations'])} | {g(r['ce_chunk'])} | {g(r['total'])} |")


HEADER = ("| model | method | strategy | micro_bsz | ctx | grad_cp | frozen GiB | trained states GiB "
          "| activations GiB (measured) | CE chunk GiB | total GiB/GPU |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_grad_enabled(True)
    if a.table:
        print(HEADER)
        for preset in ("1.6b", "3b", "7b"):
            for cp in (0, 1):
                b = argparse.Namespace(**{**vars(a), "model_preset": preset, "grad_cp": cp})
                print(row(b, plan(b)), flush=True)
        return 0
    try:
        measured = measured_peak_bytes(a.measured) if a.measured else None  # a bad file fails before the plan
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = plan(a)
    print(f"trainable parameters {r['trainable_params']:,} of {r['total_params']:,}")
    print(HEADER)
    print(row(a, r))
    if "linearity" in r:
        print(f"saved bytes at 2x the measuring micro-batch / at 1x: {r['linearity']:.3f} (2.000 = linear)")
    if measured is not None:
        print(f"plan {r['total'] / GIB:.2f} GiB vs measured {measured / GIB:.2f} GiB ({a.measured}): "
              f"plan / measured = {r['total'] / measured:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokens/s and peak memory of whole training steps, Bone against LoRA (the paper's Table 6).

One step is what train.py runs per micro-batch without DeepSpeed: forward under bf16 autocast
(frozen base weights stored in bf16, adapter tensors fp32), `token_loss`, backward, global
gradient-norm clip at 1.0, AdamW (betas 0.9/0.99, eps 1e-8) on what trains. The models are built
from random weights (the reference init, with its zero-initialised linears filled with noise so
that every matmul and PiSSA's SVD see non-trivial values), so no checkpoint is needed.

    # the paper's setting (batch 1, ctx 512, Bone b=64 vs LoRA r=32: 33.0M / 55.1M trainable)
    python bench/bench_train_step.py --device cuda --presets 1.6b,3b --methods bone,lora \\
        --grad_cp 1,0 --json out.json
    # small CPU run (overrides the preset's sizes)
    python bench/bench_train_step.py --device cpu --dtype fp32 --presets 1.6b --n_layer 4 \\
        --n_embd 256 --vocab 4096 --ctx_len 256
    # print the table of an earlier run
    python bench/bench_train_step.py --report out.json
    # chunked against plain cross-entropy, V = 65536 and 4096 tokens per micro-batch (memory)
    python bench/bench_train_step.py --device cpu --dtype fp32 --presets 1.6b --n_layer 2 \\
        --n_embd 256 --micro_bsz 8 --ctx_len 512 --methods bone --ce fused,chunked,plain --grad_cp 0
    # the same with a trained head (--methods full: every parameter trains, as --peft none)
    python bench/bench_train_step.py --device cpu --dtype fp32 --presets 1.6b --n_layer 2 \\
        --n_embd 256 --micro_bsz 8 --ctx_len 512 --methods full --ce fused,chunked,plain --grad_cp 0

--ce fused (train.py's default --chunked_ce 1: the logits' gradient, and the head weight's when the
head trains, formed in forward per token chunk, the head applied once), chunked (head +
cross-entropy in token chunks, recomputed in backward; train.py's path for a ZeRO-3 partitioned
head) or plain (the whole (B, T, V) fp32 logits and their gradient); a comma list runs each, and
the table then ends with each method's peak memory fused / plain and chunked / plain.
--methods full builds no adapters and trains every parameter, the head included (from-scratch
pre-training, train.py --peft none).
Every (preset, grad_cp, method) runs --repeats times in rounds whose method order alternates
(bone, lora / lora, bone, ...), each run in a freshly built model, so the spread between rounds
shows the noise. kt/s = micro_bsz * ctx_len * steps / (time of the timed steps) / 1000.
Peak memory: torch.cuda.max_memory_allocated (and _reserved) after the model is built, so it
counts the weights, adapters, gradients, AdamW state and activations; on CPU the process's peak
RSS (VmHWM, reset per run where the kernel allows it), which includes the Python process itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone.config import RWKV6Config, default_dim_ffn  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402
from rwkv_bone.peft import apply_peft, count_trainable  # noqa: E402
from rwkv_bone.train.loss import chunked_token_loss, fused_token_loss  # noqa: E402
from rwkv_bone.train.module import optimizer_groups, token_loss  # noqa: E402
from rwkv_bone.train.run import cast_for_training  # noqa: E402

# Paper Table 6 (one RTX 4090, batch 1, ctx 512): (GPU memory MB, kt/s).
PAPER_TABLE6 = {
    "1.6b": {"lora": (7314, 5.86), "bone": (12276, 4.11), "bone(checkpoint)": (7398, 3.46)},
    "3b": {"lora": (12074, 3.62), "bone": (22978, 2.16), "bone(checkpoint)": (12168, 1.72)},
}
METHOD_LABELS = ("bone", "bone-row", "bone-col", "bone-ab", "lora", "pissa", "olora", "full")


# ---- what to build --------------------------------------------------------------------------
def bench_config(preset: str, n_layer: int | None, n_embd: int | None, vocab: int | None) -> RWKV6Config:
    """A preset with optional size overrides; a new n_embd also resets A = C and F = 3.5 C."""
    overrides: dict[str, int] = {}
    if n_layer:
        overrides["n_layer"] = n_layer
    if vocab:
        overrides["vocab_size"] = vocab
    if n_embd:
        overrides.update(n_embd=n_embd, dim_att=n_embd, dim_ffn=default_dim_ffn(n_embd))
    return RWKV6Config.preset(preset, **overrides)


def peft_options(label: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """("bone", {...}) etc. for a --methods entry; "bone" uses --bone_mode, "bone-col" forces col;
    "full" is ("none", {}): no adapters, every parameter (the head too) trains, as --peft none."""
    if label == "full":
        return "none", {}
    if label.startswith("bone"):
        mode = label.split("-", 1)[1] if "-" in label else args.bone_mode
        return "bone", {"bone_b": args.bone_b, "bone_mode": mode}
    if label == "lora":
        return "lora", {"lora_r": args.lora_r, "lora_alpha": args.lora_r}
    return label, {"pissa_r": args.lora_r, "svd_niter": args.svd_niter}  # pissa / olora, scale 1


@torch.no_grad()
def _fill_zero_linears_(model: RWKV6, seed: int) -> None:
    """The reference init zeroes att.output, ffn.receptance and ffn.value; give them noise
    (std 0.5/sqrt(in)) so the run computes on non-trivial values."""
    g = torch.Generator(device=model.emb.weight.device).manual_seed(seed)
    for module in model.blocks.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            w = module.weight
            w.copy_(torch.randn(w.shape, generator=g, device=w.device) * (0.5 / w.shape[1] ** 0.5))


def build_model(config: RWKV6Config, label: str, args: argparse.Namespace, device: str,
                bf16: bool, grad_cp: bool) -> RWKV6:
    """Random base + adapters, in the dtypes train.py's build_model leaves them in."""
    torch.manual_seed(args.seed)
    model = RWKV6.from_config(config, device=device, dtype=torch.float32)
    _fill_zero_linears_(model, args.seed)
    if bf16:
        model = model.to(torch.bfloat16)  # train.py loads the base checkpoint in bf16
    method, options = peft_options(label, args)
    if method == "none":  # as train.py --peft none
        model.requires_grad_(True)
    else:
        apply_peft(model, method, **options)
    cast_for_training(model, bf16)  # as train.py does
    model.grad_cp = grad_cp
    return model.train()


# ---- memory ---------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) / 1024**2 if m else None
    except OSError:
        return None


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- one run --------------------------------------------------------------------------------
def run_one(preset: str, label: str, grad_cp: bool, rnd: int, args: argparse.Namespace,
            ce: str = "chunked") -> dict[str, Any]:
    device, bf16 = args.device, args.dtype == "bf16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = bench_config(preset, args.n_layer, args.n_embd, args.vocab)
    method, options = peft_options(label, args)
    rec: dict[str, Any] = dict(preset=preset, method=label, grad_cp=int(grad_cp), round=rnd,
                               n_layer=config.n_layer, n_embd=config.n_embd, vocab=config.vocab_size,
                               dim_ffn=config.dim_ffn, ctx_len=args.ctx_len, micro_bsz=args.micro_bsz,
                               dtype=args.dtype, device=device, ce=ce)
    if method == "none":
        meta = RWKV6.from_config(RWKV6Config.preset(preset), device="meta")
        rec["trainable_at_preset_size"] = sum(p.numel() for p in meta.parameters())
    else:
        rec["trainable_at_preset_size"] = count_trainable(preset, method, **options)  # meta device
    _free(device)
    t0 = time.perf_counter()
    model = build_model(config, label, args, device, bf16, grad_cp)
    sync()
    rec["build_s"] = time.perf_counter() - t0
    _free(device)  # the fp32 build's cached blocks would otherwise count as reserved memory
    params = [p for p in model.parameters() if p.requires_grad]
    rec["trainable"] = sum(p.numel() for p in params)
    rec["trained_dtypes"] = sorted({str(p.dtype) for p in params})
    rec["frozen_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=2e-5, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, config.vocab_size, (args.micro_bsz, args.ctx_len + 1), generator=g)
    x, y = idx[:, :-1].to(device), idx[:, 1:].to(device)  # (B, T) each

    def step() -> float:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if ce == "chunked":  # head + CE recomputed per chunk in backward
                h, _ = model.forward_features(x)  # (B, T, C)
                loss = chunked_token_loss(model.head, h, y)
            elif ce == "fused":  # as train.py --chunked_ce 1: the head applied once, frozen or trained
                h, _ = model.forward_features(x)
                loss = fused_token_loss(model.head.weight, h, y)
            else:
                loss = token_loss(model(x), y)  # (B, T, V) fp32 logits
        value = loss.item()  # train.py reads the loss every step (a sync point there too)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_ok = device != "cuda" and _reset_peak_rss()
    losses, times, cpu_times = [], [], []
    for i in range(args.warmup + args.steps):
        sync()
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    tokens = args.micro_bsz * args.ctx_len
    # With --threads 1 on CPU, the process's CPU time hardly depends on other jobs sharing the
    # machine (with more threads, OpenMP's spin-waiting inflates it under contention too).
    rec.update(step_s=times, kt_s=tokens * len(times) / sum(times) / 1e3, step_cpu_s=cpu_times,
               kt_per_cpu_s=tokens * len(times) / max(sum(cpu_times), 1e-9) / 1e3,
               median_step_ms=statistics.median(times) * 1e3, loss_first=losses[0], loss_last=losses[-1])
    if device == "cuda":
        rec["peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        rec["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3
    else:
        rec["peak_rss_gb"] = _peak_rss_gb() if rss_ok else None
    if not all(math.isfinite(v) for v in losses):
        rec["error"] = f"non-finite loss {losses}"
    return rec  # the model and optimizer go with this frame; main() then frees the cache


def schedule(args: argparse.Namespace) -> list[tuple[str, str, bool, int]]:
    """(preset, method, grad_cp, round) in run order: grad_cp values in the order given, then
    presets, then rounds whose method order alternates so drift does not favour one method.
    With several --ce values a method is "bone|plain" etc. (see split_label)."""
    labels = args.methods if len(args.ce) == 1 else [f"{m}|{c}" for m in args.methods for c in args.ce]
    out = []
    for cp in args.grad_cp:
        for preset in args.presets:
            for rnd in range(args.repeats):
                methods = labels if rnd % 2 == 0 else labels[::-1]
                out += [(preset, m, cp, rnd) for m in methods]
    return out


def split_label(label: str, args: argparse.Namespace) -> tuple[str, str]:
    """("bone", "plain") from "bone|plain"; a bare method uses the single --ce value."""
    method, _, ce = label.partition("|")
    return method, ce or args.ce[0]


def ce_memory_ratios(summary: list[dict[str, Any]]) -> list[str]:
    """'preset grad_cp method: fused (or chunked) X GB / plain Y GB = r' for each method run both ways."""
    rows = {(r["preset"], r["grad_cp"], r["method"]): r for r in summary}
    out = []
    for (preset, cp, label), row in rows.items():
        method, _, ce = label.partition("|")
        plain = rows.get((preset, cp, f"{method}|plain"))
        if ce in ("chunked", "fused") and plain and row["mem_gb"] and plain["mem_gb"]:
            out.append(f"{preset} grad_cp={cp} {method}: peak memory {ce} CE {row['mem_gb']:.2f} GB / plain "
                       f"{plain['mem_gb']:.2f} GB = {row['mem_gb'] / plain['mem_gb']:.2f}; kt/s "
                       f"{_f(row['kt_s_best'], '.2f')} / {_f(plain['kt_s_best'], '.2f')}")
    return out


# ---- report ---------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (preset, grad_cp, method): best and all kt/s, peak memory, ratios to LoRA."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        key = (r["preset"], r["grad_cp"], r["method"])
        row = rows.setdefault(key, dict(preset=r["preset"], grad_cp=r["grad_cp"], method=r["method"],
                                        trainable=r.get("trainable"), kt_s_all=[], mem_gb=None,
                                        errors=[]))
        if "error" in r:
            row["errors"].append(r["error"])
        if "kt_s" in r:
            row["kt_s_all"].append(r["kt_s"])
            if r.get("kt_per_cpu_s") is not None:
                row["kt_per_cpu_s_best"] = max(row.get("kt_per_cpu_s_best") or 0.0, r["kt_per_cpu_s"])
            mem = r.get("peak_alloc_gb", r.get("peak_rss_gb"))
            if mem is not None:
                row["mem_gb"] = max(row["mem_gb"] or 0.0, mem)
            if r.get("peak_reserved_gb") is not None:
                row["reserved_gb"] = max(row.get("reserved_gb") or 0.0, r["peak_reserved_gb"])
    for row in rows.values():
        row["kt_s_best"] = max(row["kt_s_all"]) if row["kt_s_all"] else None
    for row in rows.values():
        ce = row["method"].partition("|")[2]
        ref = rows.get((row["preset"], row["grad_cp"], "lora|" + ce if ce else "lora"))
        ok = ref and ref["kt_s_best"] and row["kt_s_best"]
        row["speed_vs_lora"] = row["kt_s_best"] / ref["kt_s_best"] if ok else None
        row["mem_vs_lora"] = row["mem_gb"] / ref["mem_gb"] if ok and ref["mem_gb"] and row["mem_gb"] else None
    return list(rows.values())


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    cpu = s["device"] != "cuda"
    mem = "peak RSS GB" if cpu else "peak alloc GB (reserved)"
    extra = " kt per CPU-s |" if cpu else ""  # on a shared CPU, CPU time is the steadier figure
    lines = [f"train step on {s['device_name']}: {s['dtype']}, micro_bsz {s['micro_bsz']}, "
             f"ctx {s['ctx_len']}, {s['steps']} timed steps after {s['warmup']} warm-up, "
             f"{s['repeats']} rounds; WKV: {s['wkv_path']}; torch {s['torch']}",
             "",
             f"| preset | grad_cp | method | trainable | kt/s per round | best kt/s |{extra} {mem} "
             "| kt/s vs LoRA | memory vs LoRA |",
             "|---|---|---|---|---|---|" + "---|" * (4 if cpu else 3)]
    for row in result["summary"]:
        mem_s = _f(row["mem_gb"], ".2f")
        if row.get("reserved_gb"):
            mem_s += f" ({row['reserved_gb']:.2f})"
        rounds = " / ".join(f"{v:.2f}" for v in row["kt_s_all"]) or "-"
        if row["errors"]:
            rounds += f" [{len(row['errors'])} failed: {row['errors'][0][:80]}]"
        cpu_s = f" {_f(row.get('kt_per_cpu_s_best'), '.2f')} |" if cpu else ""
        lines.append(f"| {row['preset']} | {row['grad_cp']} | {row['method']} | "
                     f"{_f(row['trainable'], ',')} | {rounds} | {_f(row['kt_s_best'], '.2f')} |{cpu_s} {mem_s} | "
                     f"{_f(row['speed_vs_lora'], '.2f')} | {_f(row['mem_vs_lora'], '.2f')} |")
    ratios = ce_memory_ratios(result["summary"])
    if ratios:
        lines += [""] + ratios
    lines.append("")
    lines.append("paper Table 6 (RTX 4090, batch 1, ctx 512), Bone/LoRA: " + "; ".join(
        f"{p} kt/s {t['bone'][1] / t['lora'][1]:.2f} mem {t['bone'][0] / t['lora'][0]:.2f}, "
        f"with checkpoint kt/s {t['bone(checkpoint)'][1] / t['lora'][1]:.2f} "
        f"mem {t['bone(checkpoint)'][0] / t['lora'][0]:.2f}" for p, t in PAPER_TABLE6.items()))
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------
def _list(cast):
    return lambda s: [cast(v.strip()) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--presets", type=_list(str), default=["1.6b", "3b"], help="comma list, e.g. 1.6b,3b")
    p.add_argument("--methods", type=_list(str), default=["bone", "lora"],
                   help=f"comma list among {', '.join(METHOD_LABELS)}")
    p.add_argument("--ctx_len", type=int, default=512)
    p.add_argument("--micro_bsz", type=int, default=1, help="batch (the paper's Table 6 uses 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel builds, caches)")
    p.add_argument("--repeats", type=int, default=2, help="rounds per configuration")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: frozen base bf16 + autocast, as train.py --precision bf16")
    p.add_argument("--grad_cp", type=_list(int), default=[1], help="0, 1 or 0,1 (both, in that order)")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--n_layer", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--n_embd", type=int, default=None, help="override C (A = C, F = 3.5 C)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--ce", type=_list(str), default=["chunked"],
                   help="cross-entropy: fused (train.py's default with a frozen head), chunked, plain, "
                        "or a comma list such as fused,chunked,plain")
    p.add_argument("--bone_b", type=int, default=64)
    p.add_argument("--bone_mode", choices=["row", "col", "ab"], default="row")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA / PiSSA / OLoRA rank (alpha = r)")
    p.add_argument("--svd_niter", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every run)")
    p.add_argument("--report", default=None, help="only print the table of an earlier --json file")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHOD_LABELS]
    if bad:
        p.error(f"unknown method {bad[0]!r}; choose among {', '.join(METHOD_LABELS)}")
    if not args.ce or any(c not in ("fused", "chunked", "plain") for c in args.ce):
        p.error("--ce takes fused, chunked, plain or a comma list of them")
    if any(v not in (0, 1) for v in args.grad_cp):
        p.error("--grad_cp takes 0, 1 or a comma list of them")
    for name in ("ctx_len", "micro_bsz", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.report:
        p.error("--device cuda was asked for but CUDA is not available; use --device cpu")
    return args


def _wkv_path(device: str) -> str:
    if device != "cuda":
        return "chunked (CPU)"
    from rwkv_bone.wkv.cuda import cuda_kernel_available

    return "CUDA kernel" if cuda_kernel_available() else "chunked (the CUDA kernel did not build)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(format_table(json.load(f)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "report")}
    settings.update(torch=torch.__version__, cuda=torch.version.cuda, wkv_path=_wkv_path(args.device),
                    device_name=torch.cuda.get_device_name() if args.device == "cuda"
                    else f"CPU ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})")
    result: dict[str, Any] = {"settings": settings, "runs": [], "summary": []}
    failed = 0
    for preset, label, cp, rnd in schedule(args):
        try:
            method, ce = split_label(label, args)
            rec = run_one(preset, method, bool(cp), rnd, args, ce)
            rec["method"] = label
        except (RuntimeError, ValueError) as exc:  # OOM and friends: record, go on with the rest
            rec = dict(preset=preset, method=label, grad_cp=cp, round=rnd,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        _free(args.device)  # outside the except block, whose traceback still holds the model
        failed += "error" in rec
        result["runs"].append(rec)
        result["summary"] = summarise(result["runs"])
        mem = rec.get("peak_alloc_gb", rec.get("peak_rss_gb"))
        print(f"{preset} grad_cp={cp} {label:8s} round {rnd}: " + (
            f"{rec['kt_s']:.3f} kt/s, median step {rec['median_step_ms']:.1f} ms, peak {_f(mem, '.2f')} GB, "
            f"trainable {rec['trainable']:,}, build {rec['build_s']:.1f} s, loss "
            f"{rec['loss_first']:.3f} -> {rec['loss_last']:.3f}" if "kt_s" in rec else "FAILED")
            + (f" [{rec['error']}]" if "error" in rec else ""), flush=True)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.json)
    print()
    print(format_table(result))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

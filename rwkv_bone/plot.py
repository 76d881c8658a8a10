"""Loss curves of one or more training runs (each run folder holds metrics.csv and run.json).

    python -m rwkv_bone.plot RUN_DIR [RUN_DIR ...] [--output loss.png] [--smooth 20] [--x tokens|step]

overlays the runs (e.g. Bone vs LoRA vs PiSSA as in the paper's Figure 1), each labelled from its
settings ("bone-row b=64", "lora r=32", ...), raw loss faint and a moving average on top.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Sequence

from .errors import UserError


def read_metrics(run_dir: str) -> dict[str, list[float]]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; give the --proj_dir of a training run")
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                try:
                    cols.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    cols.setdefault(k, []).append(float("nan"))
    return cols


def run_label(run_dir: str) -> str:
    """'bone-row b=64 (L24 C2048)' from run.json; the folder name when there is none."""
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return os.path.basename(os.path.normpath(run_dir))
    peft = s.get("peft", "none")
    if peft == "bone":
        label = f"Bone-{s.get('bone_mode', 'row')} b={s.get('bone_b')}"
    elif peft in ("lora", "olora"):
        label = f"{'LoRA' if peft == 'lora' else 'OLoRA'} r={s.get('lora_r')}"
    elif peft == "pissa":
        label = f"PiSSA r={s.get('pissa_r') or s.get('lora_r')}"
    else:
        label = "full"
    if s.get("model"):
        label += f" ({s['model']})"
    return label


def plot_labels(run_dirs: Sequence[str]) -> list[str]:
    """run_label of each run; runs with equal settings are told apart by their folder name."""
    labels = [run_label(d) for d in run_dirs]
    return [f"{lab} [{os.path.basename(os.path.normpath(d))}]" if labels.count(lab) > 1 else lab
            for lab, d in zip(labels, run_dirs)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_runs(run_dirs: Sequence[str], output: str, smooth: int = 0, x_axis: str = "step") -> str:
    """Draw the loss of every run into `output` (PNG, written atomically); returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    from .atomic import atomic_path, check_writable_dir

    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; give the path of the .png file to write")
    check_writable_dir(output, "--output")
    labels = plot_labels(run_dirs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run_dir, label in zip(run_dirs, labels):
        m = read_metrics(run_dir)
        if not m.get("loss"):
            continue
        xs = m["tokens"] if x_axis == "tokens" else m["step"]
        window = smooth or max(1, len(m["loss"]) // 50)
        line, = ax.plot(xs, m["loss"], alpha=0.25, linewidth=0.8)
        ax.plot(xs, moving_average(m["loss"], window), color=line.get_color(), label=label)
    ax.set_xlabel("tokens" if x_axis == "tokens" else "optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = atomic_path(output) + ".png"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_bone.plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="training run folders (--proj_dir), each with metrics.csv")
    p.add_argument("--output", default="loss.png", help="PNG to write")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window in steps (0 = automatic)")
    p.add_argument("--x", dest="x_axis", default="step", choices=("step", "tokens"), help="x axis")
    a = p.parse_args(argv)
    print(plot_runs(a.runs, a.output, a.smooth, a.x_axis))
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)

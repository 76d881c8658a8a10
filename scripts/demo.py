"""The whole product end to end on the data the repository ships, CPU only, in a few minutes.

    python scripts/demo.py [--out demo_out] [--no_lora]

1. tokenise data/demo/pretrain.txt and data/demo/sft.jsonl into binidx (make_data.py)
2. train a tiny RWKV-6 base (L4, C128, World vocabulary) from scratch on the plain text
3. fine-tune it with Bone (b=64) on the instruction pairs, and LoRA r=32 with the same number of
   trainable parameters for comparison (skip with --no_lora)
4. merge the Bone adapter into a plain RWKV-6 checkpoint (merge.py)
5. answer a few questions with the base and with the merged model (generate.py, greedy)
6. overlay the fine-tuning loss curves (python -m rwkv_bone.plot)

Every step is a command a user can type; each is printed before it runs. Everything lands in --out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

QUESTIONS = (
    "Which day comes after Friday?",
    "What is the opposite of hot?",
    "What sound does a dog make?",
    "What is 3 plus 4?",
)

# Tiny base: 4 layers, width 128, the full World vocabulary so the real tokenizer works end to end.
BASE_DIMS = ["--n_layer", "4", "--n_embd", "128"]
CPU = ["--accelerator", "cpu", "--precision", "fp32", "--progress", "0"]


class StepFailed(Exception):
    pass


def run(step: str, cmd: list[str], capture: bool = False) -> str:
    """Run one command from the repository root, echoing it; its output streams to the terminal."""
    print(f"\n=== {step}\n$ {shlex.join(os.path.relpath(c, ROOT) if c == PY else c for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode != 0:
        if capture and done.stdout:
            print(done.stdout)
        raise StepFailed(f"{step} failed (exit {done.returncode}); its output is above")
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    if capture:
        print(done.stdout.rstrip())
    return done.stdout or ""


def chat_prompt(question: str) -> str:
    """make_data.py's instruction template, so the fine-tuned model sees what it was trained on."""
    return f"User: {question}\n\nAssistant:"


def answers(model_path: str, title: str) -> list[str]:
    """What `python generate.py --model MODEL --greedy --max_tokens 16 --stop '\\n\\n' --prompt ...`
    prints for each question, computed in this process so the model and tokenizer load once."""
    import torch

    from rwkv_bone.data.tokenizer import load_tokenizer
    from rwkv_bone.generate import generate
    from rwkv_bone.loading import load_model

    print(f"\n=== {title}: python generate.py --model {model_path} --greedy --max_tokens 16 "
          "--stop '\\n\\n' --prompt 'User: ...\\n\\nAssistant:'", flush=True)
    model = load_model(model_path, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer()
    out = []
    for q in QUESTIONS:
        a = generate(model, tokenizer, chat_prompt(q), 16, temperature=0.0, stop=("\n\n",)).strip()
        print(f"    {q} -> {a!r}", flush=True)
        out.append(a)
    return out


def demo(out: str, with_lora: bool, pretrain_steps: int, finetune_steps: int) -> None:
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    p = lambda *parts: os.path.join(out, *parts)  # noqa: E731 - a short path helper
    t_start = time.perf_counter()

    run("1/6 tokenise the plain text",
        [PY, "make_data.py", "data/demo/pretrain.txt", "--output", p("data", "pretrain"), "--quiet"])
    run("1/6 tokenise the instruction pairs (loss only on the responses)",
        [PY, "make_data.py", "data/demo/sft.jsonl", "--output", p("data", "sft"), "--quiet"])

    run("2/6 train a tiny RWKV-6 base from scratch (all parameters)",
        [PY, "train.py", "--load_model", "", *BASE_DIMS, "--peft", "none",
         "--data_file", p("data", "pretrain"), "--ctx_len", "128", "--micro_bsz", "8",
         "--epoch_steps", str(pretrain_steps), "--lr_init", "2e-3", "--lr_final", "2e-4",
         "--lr_schedule", "cosine", "--warmup_steps", "10", "--proj_dir", p("base"), *CPU])
    base = p("base", "rwkv-0.pth")

    finetune = ["--data_file", p("data", "sft"), "--data_type", "sft", "--ctx_len", "24", "--micro_bsz", "32",
                "--epoch_steps", str(finetune_steps), "--lr_init", "1e-3", *CPU]
    run("3/6 fine-tune with Bone (b=64; only the adapters train)",
        [PY, "train.py", "--load_model", base, "--peft", "bone", "--bone_b", "64", "--proj_dir", p("bone"),
         *finetune])
    runs = [p("bone")]
    if with_lora:
        run("3/6 the same with LoRA r=32 (equal trainable parameters), for comparison",
            [PY, "train.py", "--load_model", base, "--peft", "lora", "--lora_r", "32", "--proj_dir", p("lora"),
             *finetune])
        runs.append(p("lora"))

    merged = p("merged.pth")
    run("4/6 merge the Bone adapter into a plain RWKV-6 checkpoint",
        [PY, "merge.py", "--base", base, "--adapter", p("bone", "rwkv-0.pth"), "--output", merged])

    before = answers(base, "5/6 base model")
    after = answers(merged, "5/6 merged Bone model")

    curves = p("finetune_loss.png")
    run("6/6 overlay the fine-tuning loss curves", [PY, "-m", "rwkv_bone.plot", *runs, "--output", curves])

    print(f"\n=== done in {time.perf_counter() - t_start:.0f} s\n")
    for q, a0, a1 in zip(QUESTIONS, before, after):
        print(f"Q: {q}\n   base:        {a0!r}\n   after Bone:  {a1!r}")
    print(f"\nbase checkpoint:     {base}  (loss curve {p('base', 'loss.png')})")
    print(f"Bone adapter:        {p('bone', 'rwkv-0.pth')}  (loss curve {p('bone', 'loss.png')})")
    if with_lora:
        print(f"LoRA adapter:        {p('lora', 'rwkv-0.pth')}")
    print(f"merged checkpoint:   {merged}")
    print(f"fine-tuning curves:  {curves}")
    print(f"try it:              python generate.py --model {merged} --greedy --prompt "
          + shlex.quote(chat_prompt(QUESTIONS[0]).replace("\n", "\\n")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (created; earlier contents overwritten)")
    ap.add_argument("--no_lora", action="store_true", help="skip the LoRA comparison run")
    ap.add_argument("--pretrain_steps", type=int, default=150, help="optimizer steps for the base (1,024 tokens each)")
    ap.add_argument("--finetune_steps", type=int, default=120, help="optimizer steps per fine-tuning run")
    args = ap.parse_args()
    if args.pretrain_steps <= 0 or args.finetune_steps <= 0:
        print("error: --pretrain_steps and --finetune_steps must be positive", file=sys.stderr)
        return 2
    try:
        demo(os.path.abspath(args.out), not args.no_lora, args.pretrain_steps, args.finetune_steps)
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

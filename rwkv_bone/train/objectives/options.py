"""train.py's objective flags (--objective lm|dpo|grpo and their settings) and the combinations
that cannot work, each refused in one sentence before anything is written. No torch here, so
`train.py --help` stays instant."""
from __future__ import annotations

import argparse
import math

from ...errors import UserError

OBJECTIVES = ("lm", "dpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
REWARDS = ("gsm8k", "math", "exact")


def add_objective_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="lm", choices=OBJECTIVES,
                   help="lm: next-token loss; dpo: preference pairs (--data_type pairs); grpo: sampled answers "
                        "to the prompts of a .jsonl --data_file rewarded by --reward")
    g.add_argument("--dpo_beta", type=float, default=0.1, help="DPO / IPO beta")
    g.add_argument("--dpo_loss", default="sigmoid", choices=DPO_LOSSES, help="DPO loss (TRL's loss_type names)")
    g.add_argument("--reward", default="", help=f"grpo: the scorer of eval.py that rewards an answer ({', '.join(REWARDS)})")
    g.add_argument("--tokenizer", default="",
                   help="grpo: tokenizer of the .jsonl prompts, tokenizer.json or World vocab .txt (default World)")
    g.add_argument("--num_generations", type=int, default=8, help="grpo: completions sampled per prompt")
    g.add_argument("--max_new_tokens", type=int, default=256, help="grpo: tokens per completion at most")
    g.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="grpo: nucleus sampling mass")
    g.add_argument("--grpo_beta", type=float, default=0.0,
                   help="grpo: weight of the k3 KL to the reference (0 skips the reference pass)")
    g.add_argument("--grpo_epsilon", type=float, default=0.2, help="grpo: ratio clip")
    g.add_argument("--grpo_iterations", type=int, default=1, help="grpo: policy updates per batch of rollouts")
    g.add_argument("--grpo_loss", default="grpo", choices=GRPO_LOSSES,
                   help="grpo: normalisation of the token losses (TRL's loss_type names)")


def validate_objective(args: argparse.Namespace) -> None:
    o = args.objective
    for name in ("dpo_beta", "temperature", "top_p", "grpo_beta", "grpo_epsilon"):
        if not math.isfinite(getattr(args, name)):
            raise UserError(f"--{name} {getattr(args, name)} is not a finite number; give a plain number")
    if o == "lm":
        if args.data_type == "pairs":
            raise UserError("--data_type pairs holds preference pairs; train them with --objective dpo")
        return
    if args.peft == "none" and o == "grpo" and args.grpo_beta > 0:
        raise UserError("--grpo_beta above 0 needs the reference model's log-probs of every fresh rollout, which "
                        "with --peft none would be a second whole model; use --grpo_beta 0 or an adapter "
                        "(e.g. --peft bone)")
    if args.train_type == "infctx" or args.sft_pack:
        raise UserError(f"--objective {o} runs whole sequences; drop --train_type infctx and --sft_pack")
    if o == "dpo":
        if args.data_type != "pairs":
            raise UserError("--objective dpo needs preference pairs: make them with make_data.py from "
                            "prompt/chosen/rejected records and pass --data_type pairs")
        if args.dpo_beta <= 0:
            raise UserError(f"--dpo_beta must be positive, got {args.dpo_beta}")
        return
    if args.reward not in REWARDS:
        shown = f"unknown reward {args.reward!r}" if args.reward else "--objective grpo needs --reward"
        raise UserError(f"{shown}; choose one of {', '.join(REWARDS)} (eval.py's scorers)")
    if args.num_generations < 2:
        raise UserError(f"--num_generations {args.num_generations}: GRPO compares the completions of each "
                        "prompt with each other, so it needs at least 2")
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError("--max_new_tokens must be at least 1, --temperature positive and --top_p in (0, 1]")
    if args.grpo_beta < 0 or not 0 <= args.grpo_epsilon < 1:
        raise UserError("--grpo_beta must not be negative and --grpo_epsilon must lie in [0, 1)")
    K = args.grpo_iterations
    if K < 1:
        raise UserError(f"--grpo_iterations {K}: give the number of policy updates per batch of rollouts, 1 or more")
    if K > 1 and (args.epoch_steps % K or args.save_every_steps % K):
        raise UserError(f"--grpo_iterations {K} reuses each batch of rollouts for {K} steps and a resumable state "
                        f"is only saved between batches; make --epoch_steps and --save_every_steps multiples of {K}")
    if K > 1 and args.my_exit_tokens:
        # tokens per optimizer step as train/run.py's plan_run counts them
        per_step = args.micro_bsz * args.accumulate_grad_batches * args.devices * args.num_nodes * args.ctx_len
        steps = math.ceil(args.my_exit_tokens / per_step)
        if steps < args.epoch_count * args.epoch_steps and steps % K:
            raise UserError(f"--my_exit_tokens {args.my_exit_tokens} ends the run after step {steps}, inside a batch of "
                            f"rollouts that --grpo_iterations {K} reuses for {K} steps, so a resumed run would sample "
                            f"that batch anew; give a multiple of {K * per_step} tokens ({K} steps)")
    if not args.data_file.endswith(".jsonl"):
        raise UserError("--objective grpo samples answers to questions: give --data_file as a .jsonl of "
                        "records eval.py reads (question/answer, query/response, problem/solution)")


__all__ = ["OBJECTIVES", "add_objective_args", "validate_objective"]

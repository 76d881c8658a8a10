"""The objective a run trains (None = next-token loss), built from train.py's flags once the model
exists, so the reference snapshot is the adapter's start (taken before any resumed state loads)."""
from __future__ import annotations

import torch
from torch import Tensor

from .dpo import dpo_batch_loss
from .grpo import GRPOSettings, Rollouts, rollout_loss, sample_rollouts
from .reference import InitialWeights
from .synced import is_partitioned, most_over_processes


class DPOObjective:
    metric_names = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")

    def __init__(self, model, beta: float, kind: str, stored=None) -> None:
        # With an adapter the reference is its start swapped in; with --peft none (stored, a
        # objectives.stored.StoredReference) the base's log-probs computed before the first update.
        self.reference = InitialWeights(model) if stored is None else None
        self.stored, self.beta, self.kind = stored, beta, kind

    def __call__(self, module, batch: tuple[Tensor, ...], micro: int):
        x, y, mask, real = batch[:4]                        # (B, 2, T) x3, (B, 2)
        reference = self.reference
        if self.stored is not None:
            self.stored.ensure(module)
            reference = self.stored.pair_logps(batch[4], like=mask.float())  # batch[4]: (B, 1) pair numbers
        loss, m = dpo_batch_loss(module.model, reference, x, y, mask, self.beta, self.kind)
        return loss, m, real.sum()


class GRPOObjective:
    metric_names = ("reward_mean", "reward_std", "kl", "completion_tokens", "clip_fraction")

    def __init__(self, model, args, seed: int, data_file: str) -> None:
        from ...data.tokenizer import load_tokenizer
        from ...eval.records import load_records

        self.reference = InitialWeights(model) if args.grpo_beta else None
        self.settings = GRPOSettings(args.num_generations, args.max_new_tokens, args.temperature, args.top_p,
                                     args.grpo_beta, args.grpo_epsilon, args.grpo_loss)
        self.task, self.seed = args.reward, seed
        self.iterations = args.grpo_iterations
        self.buffer: dict[int, Rollouts] = {}  # micro-batch -> its rollouts, made at step buffer_step
        self.buffer_step = -1
        self.records = load_records(data_file)
        from ...errors import UserError

        self.tok = load_tokenizer(args.tokenizer or None)
        self.prompts = [self.tok.encode(r.prompt) for r in self.records]
        V = model.config.vocab_size
        top = max(max(p) for p in self.prompts)
        if top >= V:
            raise UserError(f"the prompts of {data_file} hold token id {top}, beyond the model's vocabulary "
                            f"(0..{V - 1}); pass the --tokenizer the model was trained with")
        self.vocab_limit = min(V, self.tok.vocab_size)

    def reward(self, record: int, tokens: list[int]) -> float:
        """eval.py's verdict on one completion: 1 correct, 0 not."""
        from ...eval.answers import extract, is_correct
        from ...eval.evaluate import STOP_TEXT, cut_at_stop

        text = cut_at_stop(self.tok.decode([t for t in tokens if t != 0]), (STOP_TEXT,))
        gold = extract(self.task, self.records[record].answer)
        return float(is_correct(self.task, extract(self.task, text), gold))

    def __call__(self, module, batch: tuple[Tensor, ...], micro: int):
        idx = [int(i) for i in batch[0].flatten().tolist()]  # (B, 1) record indices
        # --grpo_iterations K: the rollouts of generation step s0 (a multiple of K) serve steps
        # s0 .. s0 + K - 1 (PromptOrder repeats their prompts); resumable states only fall on such
        # steps (validate_objective), so a resumed run regenerates exactly what it had.
        s0 = module.step - module.step % self.iterations
        if self.buffer_step != s0:
            self.buffer, self.buffer_step = {}, s0
        ro = self.buffer.get(micro)
        if ro is None or ro.prompts != idx:
            # Samples are a pure function of (seed, generation step, rank, micro-batch): --resume draws the same.
            g = torch.Generator().manual_seed(hash((self.seed, s0, module.global_rank, micro)) % (2**63))
            was_training = module.model.training
            # ZeRO-3: every process makes the model calls of the busiest (objectives/synced.py).
            most = (lambda n: most_over_processes(n, module.device)) if is_partitioned(module.model) else None
            ro = sample_rollouts(module.model, [self.prompts[i] for i in idx],
                                 lambda i, toks: self.reward(idx[i], toks), self.settings, g,
                                 vocab_limit=self.vocab_limit, records=idx, most=most)
            module.model.train(was_training)
            self.buffer[micro] = ro
        loss, m = rollout_loss(module.model, self.reference, ro, self.settings)
        return loss, m, m["completion_tokens"] * len(idx) * self.settings.num_generations


def build_objective(o, seed: int, data_file: str, model, stored_reference=None):
    """o: the run's ObjectiveConfig (train/config.py); stored_reference: DPO's StoredReference
    (objectives/stored.py) for --peft none, else None."""
    if o.objective == "dpo":
        return DPOObjective(model, o.dpo_beta, o.dpo_loss, stored_reference)
    if o.objective == "grpo":
        return GRPOObjective(model, o, seed, data_file)
    return None


__all__ = ["DPOObjective", "GRPOObjective", "build_objective"]

"""Real tokens/s of SFT training, packed rows (--sft_pack 1) against one padded document per row.

    python bench/bench_pack.py [--ctx_len 512] [--micro_bsz 4] [--docs 2000] [--steps 4]
                               [--n_layer 2] [--n_embd 256] [--vocab 4096] [--threads 0]

The documents follow a MetaMathQA-like length mix (lognormal, median 150 tokens, a tail beyond
ctx_len that is truncated; mean about a third of ctx 512), the first ~40% of each a prompt (loss
mask 0). Both modes draw their rows from the real samplers (rwkv_bone.train.data: SFTDocuments,
PackedSFTDocuments) and run the training step of train.py (RWKVTrainModule.batch_loss with the
chunked cross-entropy, backward, AdamW) on the same small random model, interleaved step by
step. real tokens/s = non-padding positions / wall time; "fill" = real positions / ctx_len
averaged over the whole pass. Goal: packed / padded >= 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwkv_bone.config import RWKV6Config  # noqa: E402
from rwkv_bone.model import RWKV6  # noqa: E402
from rwkv_bone.train.data import PackedSFTDocuments, SFTDocuments  # noqa: E402
from rwkv_bone.train.args import parse_args  # noqa: E402
from rwkv_bone.train.config import TrainConfig  # noqa: E402
from rwkv_bone.train.module import RWKVTrainModule  # noqa: E402


class Docs:
    """In-memory documents with the reader interface of the samplers."""

    def __init__(self, docs: list[np.ndarray]) -> None:
        self.sizes = np.array([len(d) for d in docs], dtype=np.int64)
        self.tokens = np.concatenate(docs)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        s, e = self.starts[i] + offset, self.starts[i] + self.sizes[i]
        return self.tokens[s:e if length is None else min(e, s + length)]


def metamath_like(n: int, vocab: int, seed: int) -> tuple[Docs, Docs]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(150), 0.55, n), 24, 900).astype(np.int64)
    docs = [rng.integers(1, vocab, L).astype(np.int64) for L in lengths]
    masks = [(np.arange(L) >= int(0.4 * L)).astype(np.uint8) for L in lengths]
    return Docs(docs), Docs(masks)


def fill(sampler, rows: int) -> float:
    return float(np.mean([int(sampler(g)[3]) for g in range(rows)])) / sampler.ctx_len


def batches(sampler, micro_bsz: int):
    g = 0
    while True:
        rows = [sampler(g + i) for i in range(micro_bsz)]
        g += micro_bsz
        yield tuple(torch.from_numpy(np.stack([np.asarray(r[j]) for r in rows])) for j in range(len(rows[0])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx_len", type=int, default=512)
    p.add_argument("--micro_bsz", type=int, default=4)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reader, masks = metamath_like(args.docs, args.vocab, args.seed)
    padded = SFTDocuments(reader, masks, args.ctx_len, args.seed)
    packed = PackedSFTDocuments(reader, masks, args.ctx_len, args.seed)
    packed.locate(0)
    n_packed = packed.pass_rows[0]
    print(f"{args.docs} documents, mean length {reader.sizes.mean():.0f} (median {np.median(reader.sizes):.0f}, "
          f"{(reader.sizes > args.ctx_len + 1).mean():.1%} truncated at ctx {args.ctx_len}); rows per pass: "
          f"padded {args.docs}, packed {n_packed}; fill: padded {fill(padded, args.docs):.3f}, "
          f"packed {fill(packed, n_packed):.3f}")

    torch.manual_seed(args.seed)
    cfg = RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab)
    model = RWKV6.from_config(cfg).train()
    run_cfg = TrainConfig.from_args(parse_args(["--load_model", "", "--n_layer", str(args.n_layer), "--n_embd",
                                                str(args.n_embd), "--peft", "none", "--dry_run"]))
    optim = dataclasses.replace(run_cfg.optim, chunked_ce=True, l2wrap=False)
    module = RWKVTrainModule(model, optim, run_cfg.data, seed=args.seed, start_step=0, total_steps=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    modes = {"padded": batches(padded, args.micro_bsz), "packed": batches(packed, args.micro_bsz)}
    spent = {k: 0.0 for k in modes}
    real = {k: 0 for k in modes}
    for i in range(args.steps + 1):
        for name, it in modes.items():  # interleaved, so machine load hits both alike
            batch = next(it)
            x, y, m, n = batch[:4]
            doc_start = batch[4] if len(batch) > 4 else None
            t = time.perf_counter()
            loss = module.batch_loss(x, y, m, doc_start)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step of each mode warms up
                spent[name] += time.perf_counter() - t
                real[name] += int(n.sum())
    rate = {k: real[k] / spent[k] / 1e3 for k in modes}
    print(f"model L{args.n_layer} C{args.n_embd} V{args.vocab}, micro_bsz {args.micro_bsz}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for k in modes:
        print(f"  {k}: {rate[k]:.3f} real kt/s ({real[k]} real tokens in {spent[k]:.2f} s)")
    print(f"packed / padded real tokens/s: {rate['packed'] / rate['padded']:.2f}x")


if __name__ == "__main__":
    main()

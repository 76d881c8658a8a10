"""Training samples from memory-mapped binidx data, as pure functions of a global sample number.

Every sample the trainer sees is identified by its global sample number
    g = ((step * accumulate + micro) * world_size + rank) * micro_bsz + row
(step = optimizer step, micro = micro-batch within the step, rank = process, row = row in the
micro-batch). A sample depends only on (seed, g), so a resumed run, or a rank, sees exactly the
data it would have seen in an uninterrupted run, and different ranks see different data.

Samplers (each returns x, y: int64 (ctx_len,) and, for sft, a float32 loss mask (ctx_len,)):
- random windows ("get" mode of RWKV pre-training): start uniform in [0, tokens - ctx_len - 1],
  sample = tokens[start : start + ctx_len + 1], x = sample[:-1], y = sample[1:];
- magic prime p: sample i starts at ((floor(p * 0.618034) * i^3) mod p) * ctx_len. With p prime
  and p % 3 == 2, i -> i^3 is a bijection mod p, so p consecutive samples visit every chunk once;
- sft: one document per sample (documents in a fresh random order for every pass over the data),
  s = doc[:ctx_len+1] padded with 0, x = s[:-1], y = s[1:], mask = docmask[1:] (0 on padding);
  also returns the number of real (non-padding) positions, int64 ();
- packed sft (--sft_pack 1): the documents of each pass, in that pass's order, truncated as above,
  packed greedily first-fit into ctx_len rows (a window of PACK_WINDOW open rows; a row is emitted
  when it falls out of the window, rows in order of opening). Document d contributes
  x_d = s_d[:-1], y_d = s_d[1:], mask_d = docmask_d[1:] at its offset, and doc_start marks its first
  position (so the model restarts its state there); one-token documents hold no positions and are
  skipped. Sample g is row g of the concatenated passes, so it depends only on (seed, g).
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError


class TokenReader(Protocol):
    """What the samplers need from rwkv_bone.data.binidx.MMapIndexedDataset."""

    tokens: np.ndarray  # flat memmap of the whole .bin
    sizes: np.ndarray  # (N,) tokens per document

    def __len__(self) -> int: ...

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


def global_sample_number(step: int, micro: int, row: int, *, rank: int, world_size: int,
                         accumulate: int, micro_bsz: int) -> int:
    return ((step * accumulate + micro) * world_size + rank) * micro_bsz + row


def magic_prime_start(i: int, p: int, ctx_len: int) -> int:
    """Token offset of the i-th sample of a magic-prime pass (Python ints: no overflow)."""
    return (int(p * 0.618034) * pow(i, 3, p)) % p * ctx_len


class RandomWindows:
    """Random ctx_len+1 windows of the flat token stream ('get' mode)."""

    def __init__(self, reader: TokenReader, ctx_len: int, seed: int) -> None:
        self.tokens, self.ctx_len, self.seed = reader.tokens, ctx_len, seed
        self.n = int(self.tokens.shape[0])
        if self.n < ctx_len + 1:
            raise UserError(f"the data has {self.n} tokens, fewer than ctx_len + 1 = {ctx_len + 1}; "
                            "use a smaller --ctx_len or more data")

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        start = int(np.random.default_rng([self.seed, g]).integers(0, self.n - self.ctx_len))
        s = np.asarray(self.tokens[start:start + self.ctx_len + 1], dtype=np.int64)  # (ctx_len+1,)
        return s[:-1], s[1:]


class MagicPrimeWindows:
    """One pass over the ctx_len chunks in the magic-prime order (wrapping into a new pass)."""

    def __init__(self, reader: TokenReader, ctx_len: int, magic_prime: int) -> None:
        self.tokens, self.ctx_len, self.p = reader.tokens, ctx_len, magic_prime
        from ..data.binidx import is_prime, magic_prime as best_magic_prime

        n = int(self.tokens.shape[0])
        if not (is_prime(magic_prime) and magic_prime % 3 == 2 and magic_prime <= n // ctx_len - 1):
            raise UserError(f"--magic_prime {magic_prime} must be a prime with p % 3 == 2 and "
                            f"p <= tokens // ctx_len - 1 = {n // ctx_len - 1}; for this data and ctx_len "
                            f"use --magic_prime {best_magic_prime(n, ctx_len)}")

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        start = magic_prime_start(g, self.p, self.ctx_len)
        s = np.asarray(self.tokens[start:start + self.ctx_len + 1], dtype=np.int64)
        return s[:-1], s[1:]


class SFTDocuments:
    """One document per sample with its loss mask; a new document order for every pass."""

    def __init__(self, reader: TokenReader, mask: TokenReader, ctx_len: int, seed: int) -> None:
        if len(reader) == 0:
            raise UserError("the sft data holds no documents; rebuild it with make_data.py")
        if len(mask) != len(reader) or not np.array_equal(np.asarray(mask.sizes), np.asarray(reader.sizes)):
            raise UserError("the sft mask files do not match the token files (different document sizes); "
                            "rebuild both with make_data.py")
        self.reader, self.mask, self.ctx_len, self.seed = reader, mask, ctx_len, seed
        self.n_docs = len(reader)
        self._perm_pass, self._perm = -1, np.empty(0, dtype=np.int64)

    def order(self, data_pass: int) -> np.ndarray:
        if data_pass != self._perm_pass:
            self._perm = np.random.default_rng([self.seed, 1, data_pass]).permutation(self.n_docs)
            self._perm_pass = data_pass
        return self._perm

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        data_pass, pos = divmod(g, self.n_docs)
        return self.document(int(self.order(data_pass)[pos]))

    def document(self, doc: int) -> tuple[np.ndarray, ...]:
        """x, y, mask (ctx_len,) of document `doc` padded with 0 (not trained), and its real positions."""
        T1 = self.ctx_len + 1
        toks = np.asarray(self.reader.get(doc, 0, min(T1, int(self.reader.sizes[doc]))), dtype=np.int64)
        msk = np.asarray(self.mask.get(doc, 0, toks.shape[0]), dtype=np.float32)
        s = np.zeros(T1, dtype=np.int64)
        m = np.zeros(T1, dtype=np.float32)  # padding: 0 = not trained
        s[:toks.shape[0]] = toks
        m[:msk.shape[0]] = msk
        return s[:-1], s[1:], m[1:], np.int64(max(0, toks.shape[0] - 1))


class PairDocuments(SFTDocuments):
    """Preference pairs (make_data.py on prompt/chosen/rejected records): documents 2i (prompt +
    chosen) and 2i + 1 (prompt + rejected), masks on the responses. A sample is one pair: x, y, mask
    (2, T), real positions (2,) and the pair number i (the key of a stored reference, objectives/
    stored.py); a new pair order every pass."""

    def __init__(self, reader: TokenReader, mask: TokenReader, ctx_len: int, seed: int) -> None:
        super().__init__(reader, mask, ctx_len, seed)
        if self.n_docs % 2:
            raise UserError("the pair data holds an odd number of documents; rebuild it with make_data.py "
                            "from prompt/chosen/rejected records")
        self.n_docs //= 2  # the order runs over pairs

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        data_pass, pos = divmod(g, self.n_docs)
        pair = int(self.order(data_pass)[pos])
        rows = [self.document(2 * pair + k) for k in (0, 1)]
        return (*(np.stack(parts) for parts in zip(*rows)), np.int64(pair))


class PromptOrder:
    """GRPO: sample g is the index of one prompt record; a new order every pass. With --grpo_iterations
    K each batch of prompts serves K consecutive optimizer steps (their rollouts are reused):
    sample g of step s reads the order at position (s // K) * per_step + (g mod per_step), where
    per_step = micro_bsz x accumulation x processes (the samples of one step)."""

    def __init__(self, n_records: int, seed: int, iterations: int = 1, per_step: int = 1) -> None:
        self.n, self.seed = n_records, seed
        self.iterations, self.per_step = iterations, per_step
        self._pass, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        step, within = divmod(g, self.per_step)
        data_pass, pos = divmod((step // self.iterations) * self.per_step + within, self.n)
        if data_pass != self._pass:
            self._perm = np.random.default_rng([self.seed, 2, data_pass]).permutation(self.n)
            self._pass = data_pass
        return (np.int64(self._perm[pos]),)


PACK_WINDOW = 64  # open rows first-fit looks at (bounds the packing cost at O(documents x window))


def first_fit(lengths: np.ndarray, capacity: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Greedy first-fit of item lengths (each 1..capacity) into rows of `capacity`, in the given
    order, looking at the `window` most recently opened rows; returns rows of item indices in the
    order the rows were opened."""
    rows: list[list[int]] = []
    free = np.empty(0, dtype=np.int64)  # free space of the open rows (rows[first:])
    first = 0
    for i, n in enumerate(lengths.tolist()):
        fits = np.flatnonzero(free >= n)
        if fits.size:
            j = int(fits[0])
            free[j] -= n
            rows[first + j].append(i)
            continue
        rows.append([i])
        free = np.append(free, capacity - n)
        if free.size > window:  # the oldest open row is closed for good
            free = free[1:]
            first += 1
    return rows


class PackedSFTDocuments(SFTDocuments):
    """Several documents per ctx_len row (see the module docstring); returns x, y, mask, the number
    of real positions and doc_start (ctx_len,) bool."""

    def __init__(self, reader: TokenReader, mask: TokenReader, ctx_len: int, seed: int) -> None:
        super().__init__(reader, mask, ctx_len, seed)
        # Positions each document fills: its truncated length minus one.
        self.positions = np.minimum(np.asarray(reader.sizes, dtype=np.int64), ctx_len + 1) - 1
        if not (self.positions > 0).any():
            raise UserError("every sft document holds a single token, so there is nothing to train on; "
                            "rebuild the data with make_data.py")
        self.pass_rows: list[int] = []  # rows of each pass packed so far
        self._rows_pass, self._rows = -1, []

    def rows(self, data_pass: int) -> list[list[int]]:
        """Rows (lists of document ids) of one pass."""
        if data_pass != self._rows_pass:
            order = self.order(data_pass)
            order = order[self.positions[order] > 0]
            self._rows = [[int(order[i]) for i in row] for row in first_fit(self.positions[order], self.ctx_len)]
            self._rows_pass = data_pass
        return self._rows

    def locate(self, g: int) -> tuple[int, int]:
        """(pass, row in pass) of global sample g; passes are packed in order as needed."""
        data_pass = 0
        while True:
            if data_pass == len(self.pass_rows):
                self.pass_rows.append(len(self.rows(data_pass)))
            if g < self.pass_rows[data_pass]:
                return data_pass, g
            g -= self.pass_rows[data_pass]
            data_pass += 1

    def __call__(self, g: int) -> tuple[np.ndarray, ...]:
        data_pass, row = self.locate(g)
        L = self.ctx_len
        x = np.zeros(L, dtype=np.int64)
        y = np.zeros(L, dtype=np.int64)
        m = np.zeros(L, dtype=np.float32)  # padding: 0 = not trained
        start = np.zeros(L, dtype=bool)
        at = 0
        for doc in self.rows(data_pass)[row]:
            n = int(self.positions[doc]) + 1
            toks = np.asarray(self.reader.get(doc, 0, n), dtype=np.int64)
            msk = np.asarray(self.mask.get(doc, 0, n), dtype=np.float32)
            x[at:at + n - 1], y[at:at + n - 1], m[at:at + n - 1] = toks[:-1], toks[1:], msk[1:]
            start[at] = True
            at += n - 1
        if at < L:
            start[at] = True  # the padding is a document of its own (nothing trains on it)
        return x, y, m, np.int64(at), start


class StepSamples(Dataset):
    """The micro-batch rows this rank needs for optimizer steps [start_step, total_steps), in order.

    Item j is row j % micro_bsz of micro-batch j // micro_bsz; a DataLoader with batch_size =
    micro_bsz and no shuffling therefore yields exactly the micro-batches of those steps.
    """

    def __init__(self, sampler, *, start_step: int, total_steps: int, rank: int, world_size: int,
                 accumulate: int, micro_bsz: int) -> None:
        self.sampler = sampler
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.accumulate, self.micro_bsz = accumulate, micro_bsz

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulate * self.micro_bsz

    def sample_number(self, j: int) -> int:
        m, row = divmod(j, self.micro_bsz)
        rel_step, micro = divmod(m, self.accumulate)
        return global_sample_number(self.start_step + rel_step, micro, row, rank=self.rank,
                                    world_size=self.world_size, accumulate=self.accumulate,
                                    micro_bsz=self.micro_bsz)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.sampler(self.sample_number(j)))


def _need_pair(prefix: str, what: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise UserError(f"{what} {prefix}{ext} does not exist; give --data_file as the binidx prefix "
                            "(without .bin/.idx) of data made with make_data.py")


def open_sampler(data_file: str, data_type: str, ctx_len: int, seed: int, magic_prime: int = 0,
                 sft_pack: bool = False):
    """Open the memory-mapped data and return the sampler function g -> sample."""
    from ..data.binidx import MMapIndexedDataset, load_masks, split_prefix

    data_file = split_prefix(data_file)
    _need_pair(data_file, "the data file")
    reader = MMapIndexedDataset(data_file)
    if data_type == "pairs":
        masks = load_masks(data_file, reader)
        if masks is None or not os.path.isfile(data_file + ".pairs.json"):
            raise UserError(f"--data_type pairs needs a pair dataset ({data_file}.pairs.json beside the data); "
                            "make it with make_data.py from prompt/chosen/rejected records")
        return PairDocuments(reader, masks, ctx_len, seed)
    if os.path.isfile(data_file + ".pairs.json"):
        raise UserError(f"{data_file} holds preference pairs; train it with --objective dpo --data_type pairs")
    if data_type == "sft":
        masks = load_masks(data_file, reader)
        if masks is None:
            raise UserError(f"--data_type sft needs the loss-mask files {data_file}.mask.bin/.idx next to the data; "
                            "make them with make_data.py (sft mode) or use --data_type binidx")
        return (PackedSFTDocuments if sft_pack else SFTDocuments)(reader, masks, ctx_len, seed)
    if int(reader.tokens.shape[0]) < ctx_len + 1:
        raise UserError(f"{data_file}.bin holds {int(reader.tokens.shape[0])} tokens, fewer than ctx_len + 1 = "
                        f"{ctx_len + 1}; use a smaller --ctx_len or more data")
    if magic_prime:
        return MagicPrimeWindows(reader, ctx_len, magic_prime)
    return RandomWindows(reader, ctx_len, seed)


def check_data_prefix(data_file: str) -> None:
    """A folder given as --data_file gets its own sentence (not "PREFIX.bin does not exist")."""
    if os.path.isdir(data_file):
        raise UserError(f"--data_file {data_file} is a folder; give the binidx prefix of the data in it "
                        "(PREFIX for PREFIX.bin / PREFIX.idx)")


def check_token_ids(data_file: str, vocab_size: int) -> None:
    """Refuse data holding ids the model has no embedding for (an IndexError mid-run otherwise, or
    silent training when the bad document is sampled late): all of the .bin is checked, once."""
    from ..data.binidx import MMapIndexedDataset, split_prefix, token_id_range

    prefix = split_prefix(data_file)
    ds = MMapIndexedDataset(prefix)
    if ds.dtype.kind == "f":
        raise UserError(f"{prefix}.bin holds {ds.dtype.name} numbers, not token ids; "
                        "rebuild it with make_data.py")
    lo, hi = token_id_range(ds)
    if lo < 0:
        raise UserError(f"{prefix}.bin holds the negative token id {lo}; the file is corrupt, rebuild it with make_data.py")
    if hi >= vocab_size:
        raise UserError(f"{prefix}.bin holds token id {hi} but the model's vocabulary has {vocab_size} ids "
                        f"(0..{vocab_size - 1}); tokenise the data with the model's tokenizer "
                        "(make_data.py --tokenizer) or train a model with a larger vocabulary")

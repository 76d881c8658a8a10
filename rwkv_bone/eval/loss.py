"""Held-out loss and perplexity over the response tokens of SFT-style data (the training loss).

Each document d (its tokens, 0 at the end) with loss mask m (1 on response tokens and the final 0,
as make_data writes it) contributes the targets y = d[1:] where m[1:] = 1:
    loss = sum over documents and targets of -log p(y_t | d[:t+1]) / (number of such targets)
    perplexity = exp(loss)
Documents come from a .jsonl (tokenised here by make_data's own record encoder in
rwkv_bone.data.records, so tokens and masks equal what training saw) or from a make_data binidx prefix with its PREFIX.mask.bin/.idx.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.records import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_RESPONSE_TEMPLATE, RecordError, RecordFormat,
                            encode_record, eval_format, parse_json_record)
from ..errors import UserError

LOSS_CHUNK = 512  # tokens per forward: bounds the (B, T, V) logits held at once


Doc = tuple[np.ndarray, np.ndarray]  # tokens (T,) int64, mask (T,) uint8


def docs_from_jsonl(path: str, tokenizer, *, prompt_field: Optional[str] = None,
                    answer_field: Optional[str] = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                    limit: Optional[int] = None) -> list[Doc]:
    """Tokens and masks of every record, exactly as make_data would write them."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist; check the path")
    docs: list[Doc] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            raw = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not raw.strip():
                continue
            try:
                rec = parse_json_record(raw)
                if "text" in rec and not (prompt_field or answer_field):
                    fmt = RecordFormat(format="text")
                else:
                    fmt, _ = eval_format(rec, prompt_field, answer_field, prompt_template,
                                         DEFAULT_RESPONSE_TEMPLATE)
                prompt, body = fmt.render(rec)
                docs.append(encode_record(tokenizer, prompt, body))
            except RecordError as e:
                raise UserError(f"{path} line {lineno}: {e}") from None
    if not docs:
        raise UserError(f"{path} contains no records; pass a .jsonl file with one JSON object per line")
    return docs


def docs_from_binidx(prefix: str, limit: Optional[int] = None) -> list[Doc]:
    from ..data.binidx import MMapIndexedDataset, load_masks, split_prefix

    prefix = split_prefix(prefix)
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise UserError(f"binidx data {prefix}.bin/.idx not found; give a make_data --output prefix "
                        "or a .jsonl file")
    tokens = MMapIndexedDataset(prefix)
    masks = load_masks(prefix, tokens)
    n = len(tokens) if limit is None else min(limit, len(tokens))
    docs = []
    for i in range(n):
        t = np.asarray(tokens.get(i), dtype=np.int64)
        m = np.asarray(masks.get(i), dtype=np.uint8) if masks is not None else np.ones(t.size, np.uint8)
        docs.append((t, m))
    if not docs:
        raise UserError(f"{prefix} holds no documents")
    return docs


def _batches(docs: list[Doc], batch_size: int) -> Iterator[list[int]]:
    """Document indices grouped by similar length (less padding), each group in index order."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i][0]))
    for s in range(0, len(order), batch_size):
        yield sorted(order[s:s + batch_size])


@torch.no_grad()
def doc_losses(model, docs: list[Doc], batch_size: int = 8,
               on_tokens: Optional[Callable[[int], None]] = None) -> list[tuple[float, int]]:
    """(summed loss, targets) of each document. Padding goes after a document's end, where it
    cannot change the (causal) logits of the real tokens, and carries mask 0."""
    device = model.emb.weight.device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(docs)
    for group in _batches(docs, batch_size):
        T = max(len(docs[i][0]) for i in group) - 1
        if T < 1:
            for i in group:
                out[i] = (0.0, 0)
            continue
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.zeros(len(group), T, dtype=torch.long)
        m = torch.zeros(len(group), T)
        for row, i in enumerate(group):
            t, msk = docs[i]
            n = len(t) - 1
            x[row, :n] = torch.from_numpy(t[:-1])
            y[row, :n] = torch.from_numpy(t[1:])
            m[row, :n] = torch.from_numpy(msk[1:].astype(np.float32))
        x, y, m = x.to(device), y.to(device), m.to(device)
        total = torch.zeros(len(group), dtype=torch.float64, device=device)
        state = None
        for s in range(0, T, LOSS_CHUNK):
            logits, state = model.forward_with_state(x[:, s:s + LOSS_CHUNK], state)  # (B, t, V)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y[:, s:s + LOSS_CHUNK].flatten(),
                                  reduction="none").view(len(group), -1)
            total += (nll * m[:, s:s + LOSS_CHUNK]).sum(1).double()
        counts = m.sum(1).long().tolist()
        for row, i in enumerate(group):
            out[i] = (float(total[row]), int(counts[row]))
        if on_tokens is not None:
            on_tokens(int(sum(counts)))
    return out


def summarize_losses(per_doc: list[tuple[float, int]]) -> dict:
    total = sum(s for s, _ in per_doc)
    count = sum(n for _, n in per_doc)
    if count == 0:
        raise UserError("no document has a response token to score; is this SFT data with answers?")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}

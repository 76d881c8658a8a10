"""Packed SFT samples (--sft_pack 1): first-fit packing, masks, doc starts, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_bone.errors import UserError
from rwkv_bone.train.data import PackedSFTDocuments, SFTDocuments, first_fit

from test_train_units import ArrayReader


def test_first_fit_fills_the_first_row_with_room_in_order():
    rows = first_fit(np.array([5, 4, 3, 2, 6, 1]), 8)
    assert rows == [[0, 2], [1, 3, 5], [4]]  # 5+3, 4+2+1, 6
    # A closed row (outside the window) is never filled again.
    assert first_fit(np.array([5, 7, 3]), 8, window=1) == [[0], [1], [2]]


def make_docs(n=40, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for i in range(n):
        L = int(rng.integers(1, max_len))
        docs.append(list(rng.integers(1, 1000, L)))
        p = int(rng.integers(0, L))  # prompt length
        masks.append([0] * p + [1] * (L - p))
    return docs, masks


def test_each_document_appears_once_per_pass_with_its_tokens_and_mask():
    docs, masks = make_docs()
    ctx = 24
    s = PackedSFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), ctx, seed=3)
    s.locate(0)
    n_rows = s.pass_rows[0]
    seen = []
    for g in range(n_rows):
        x, y, m, real, start = s(g)
        assert x.shape == y.shape == m.shape == start.shape == (ctx,) and start[0]
        cuts = list(np.flatnonzero(start)) + [ctx]
        filled = 0
        for a, e in zip(cuts[:-1], cuts[1:]):
            if a >= real:  # the padding
                assert not x[a:].any() and not m[a:].any() and not y[a:].any()
                continue
            seen.append((tuple(x[a:e]), tuple(y[a:e]), tuple(m[a:e])))
            filled = e
        assert real == filled  # the real positions are exactly the documents' ones
    want = []
    for d, mk in zip(docs, masks):
        d, mk = d[:ctx + 1], mk[:ctx + 1]  # truncated as in unpacked sft
        if len(d) > 1:
            want.append((tuple(d[:-1]), tuple(d[1:]), tuple(np.float32(mk[1:]))))
    assert sorted(seen) == sorted(want)
    # Packing beats one document per row.
    assert n_rows < sum(1 for d in docs if len(d) > 1) * 0.8


def test_packing_is_a_pure_function_of_seed_and_sample_number():
    docs, masks = make_docs(seed=1)
    a = PackedSFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), 32, seed=5)
    b = PackedSFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), 32, seed=5)
    c = PackedSFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), 32, seed=6)
    later = [b(g) for g in (57, 3, 30)]  # a resumed run asks for later samples first
    for got, g in zip(later, (57, 3, 30)):
        for u, v in zip(got, a(g)):
            assert np.array_equal(u, v)
    assert any(not np.array_equal(a(g)[0], c(g)[0]) for g in range(5))
    # A second pass is a new order, packed anew.
    a.locate(0)
    assert a.locate(a.pass_rows[0]) == (1, 0)


def test_unpacked_sft_reports_real_positions():
    docs, masks = make_docs(n=5)
    s = SFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), 16, seed=0)
    for g in range(5):
        x, y, m, real = s(g)
        doc = [d for d in docs if list(x[:max(1, int(real))]) == d[:max(1, int(real))]]
        assert real == min(16, len(doc[0]) - 1)


def test_single_token_documents_only_is_a_user_error():
    with pytest.raises(UserError, match="single token"):
        PackedSFTDocuments(ArrayReader([[1], [2]]), ArrayReader([[1], [1]], np.uint8), 8, 0)


# ---- the training step on packed rows ---------------------------------------------------------
def test_packed_batch_loss_equals_the_documents_run_alone():
    import dataclasses

    import torch

    from rwkv_bone.train import parse_args
    from rwkv_bone.train.config import TrainConfig
    from rwkv_bone.train.module import RWKVTrainModule
    from test_model_packed import small_model

    model = small_model(5).float()
    docs, masks = make_docs(n=12, seed=2, max_len=20)
    docs = [[t % 64 for t in d] for d in docs]
    s = PackedSFTDocuments(ArrayReader(docs), ArrayReader(masks, np.uint8), 32, seed=0)
    rows = [s(g) for g in range(2)]
    x, y, m, real, start = (torch.from_numpy(np.stack([r[i] for r in rows])) for i in range(5))
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for b in range(2):
            cuts = list(np.flatnonzero(start[b].numpy())) + [32]
            for a, e in zip(cuts[:-1], cuts[1:]):
                if a >= int(real[b]):
                    continue
                lp = torch.log_softmax(model(x[b:b + 1, a:e]), -1)[0]
                nll -= (lp.gather(1, y[b, a:e, None])[:, 0] * m[b, a:e]).sum().item()
                count += m[b, a:e].sum().item()
    cfg = TrainConfig.from_args(parse_args(["--load_model", "", "--n_layer", "2", "--n_embd", "64",
                                            "--peft", "none", "--dry_run"]))
    for chunked in (True, False):
        optim = dataclasses.replace(cfg.optim, chunked_ce=chunked, l2wrap=False)
        module = RWKVTrainModule(model, optim, cfg.data, seed=0, start_step=0, total_steps=1)
        with torch.no_grad():
            got = module.batch_loss(x, y, m, start).item()
        assert got == pytest.approx(nll / count, rel=1e-5)
        unpacked = module.batch_loss(x, y, m).item()  # without doc starts the documents leak into each other
        assert unpacked != pytest.approx(got, rel=1e-5)


STEPS = 6  # measured: loss 4.34 at step 1, 1.91 at step 6


@pytest.mark.slow
def test_packed_sft_run_trains_and_counts_real_tokens(tmp_path, monkeypatch):
    import csv
    import os

    from rwkv_bone.train import parse_args, run
    from rwkv_bone.train.module import RWKVTrainModule
    from test_train_helpers import base_flags, sft_data, tiny_checkpoint

    docs = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0], [20, 21, 22, 23, 24, 0]] * 4
    masks = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]] * 4
    data = sft_data(str(tmp_path / "sft"), docs, masks)
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pth"))
    proj = str(tmp_path / "out")
    # Record every batch trained on and every real-token count the logger takes.
    batches, taken = [], []
    step, take = RWKVTrainModule.training_step, RWKVTrainModule.take_real_tokens

    def spy_step(self, batch, batch_idx):
        batches.append([t.clone() for t in batch])
        return step(self, batch, batch_idx)

    def spy_take(self):
        taken.append(take(self))
        return taken[-1]

    monkeypatch.setattr(RWKVTrainModule, "training_step", spy_step)
    monkeypatch.setattr(RWKVTrainModule, "take_real_tokens", spy_take)
    assert run(parse_args(base_flags(ckpt, data, proj, data_type="sft", ctx_len=16, epoch_count=1,
                                     epoch_steps=STEPS, sft_pack=1))) == 0
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(float(r["kt/s"]) > 0 for r in rows)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.6 * losses[0], losses  # a real drop from the measured start
    # Real positions: every input token of a packed document (all document tokens are nonzero and
    # only the ending 0 is a target, never an input), none of the padding.
    assert len(batches) == STEPS and len(taken) == STEPS
    expected = [int((b[0] != 0).sum()) for b in batches]
    assert all(0 < e < b[0].numel() for e, b in zip(expected, batches)), expected  # some padding present
    assert taken == expected
    with pytest.raises(Exception, match="--sft_pack 1 packs sft documents"):
        run(parse_args(base_flags(ckpt, data, str(tmp_path / "o2"), sft_pack=1)))

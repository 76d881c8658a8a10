"""train.py --valid_data / --valid_every / --valid_task: held-out numbers in metrics.csv that agree
with eval.py on the saved checkpoint."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from rwkv_bone.data.prepare import PrepareOptions, prepare
from rwkv_bone.errors import UserError
from rwkv_bone.eval.evaluate import EvalOptions, evaluate
from rwkv_bone.train import parse_args, run

RECS = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a, b in ((1, 2), (3, 4), (5, 1))]


@pytest.fixture
def byte_vocab(tmp_path) -> Path:
    path = tmp_path / "bytes.txt"
    path.write_text("\n".join(f"{b + 1} {bytes([b])!r} 1" for b in range(256)) + "\n", encoding="utf-8")
    return path


def _flags(tmp_path, vocab, *extra):
    return ["--load_model", "", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "260", "--peft", "none",
            "--data_file", str(tmp_path / "sft"), "--data_type", "sft", "--ctx_len", "64", "--micro_bsz", "2",
            "--epoch_steps", "4", "--lr_init", "1e-3", "--proj_dir", str(tmp_path / "run"),
            "--accelerator", "cpu", "--precision", "fp32", "--progress", "0",
            "--valid_tokenizer", str(vocab), *extra]


def test_validation_is_logged_and_matches_eval(tmp_path, byte_vocab):
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    prepare(PrepareOptions(input=str(data), output=str(tmp_path / "sft"), tokenizer=str(byte_vocab),
                           prompt_field="question", response_field="answer", workers=1, progress=False))
    torch.set_num_threads(1)
    assert run(parse_args(_flags(tmp_path, byte_vocab, "--valid_data", str(data), "--valid_every", "2",
                                 "--valid_task", "gsm8k", "--valid_limit", "2", "--valid_max_tokens", "4"))) == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [bool(r["valid_loss"]) for r in rows] == [False, True, False, True]
    assert all(r["valid_acc"] in ("0.000000", "0.500000", "1.000000") for r in rows[1::2])
    assert float(rows[1]["valid_loss"]) != float(rows[3]["valid_loss"])  # the model moved
    summary = evaluate(EvalOptions(model=str(tmp_path / "run" / "rwkv-0.pth"), data=str(data), task="loss",
                                   tokenizer=str(byte_vocab), progress=False, quiet=True))
    assert float(rows[3]["valid_loss"]) == pytest.approx(summary["loss"], rel=1e-5)
    assert float(rows[3]["valid_ppl"]) == pytest.approx(summary["perplexity"], rel=1e-5)


def test_validation_flags_are_checked(tmp_path, byte_vocab):
    (tmp_path / "sft.bin").write_bytes(b"")
    with pytest.raises(UserError, match="need --valid_data"):
        parse_args(_flags(tmp_path, byte_vocab, "--valid_task", "gsm8k"))
    with pytest.raises(UserError, match="needs question/answer records"):
        parse_args(_flags(tmp_path, byte_vocab, "--valid_data", str(tmp_path / "sft"), "--valid_task", "math"))
    with pytest.raises(UserError, match="--valid_limit"):
        parse_args(_flags(tmp_path, byte_vocab, "--valid_data", "x.jsonl", "--valid_limit", "0"))


@pytest.mark.parametrize("template", [None, "Q: {prompt}\nA:"])
def test_validation_renders_records_with_make_data_template(tmp_path, byte_vocab, template):
    """Validation on a .jsonl sees the same tokens and masks as make_data writes with that template."""
    from types import SimpleNamespace

    from rwkv_bone.data.binidx import MMapIndexedDataset, load_masks
    from rwkv_bone.train.validate import Validator

    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    kw = {} if template is None else {"prompt_template": template}
    prepare(PrepareOptions(input=str(data), output=str(tmp_path / "sft"), tokenizer=str(byte_vocab),
                           prompt_field="question", response_field="answer", workers=1, progress=False, **kw))
    valid = SimpleNamespace(valid_tokenizer=str(byte_vocab), valid_data=str(data), valid_task="gsm8k",
                            valid_limit=3)
    v = Validator(valid, None, None, total_steps=4, **kw)
    tokens = MMapIndexedDataset(str(tmp_path / "sft"))
    masks = load_masks(str(tmp_path / "sft"), tokens)
    for i, (t, m) in enumerate(v.docs):
        assert t.tolist() == tokens.get(i).tolist() and m.tolist() == masks.get(i).tolist()
    head = (template or "User: {prompt}\n\nAssistant:").split("{prompt}")[0]
    assert all(r.prompt.startswith(head) for r in v.records)

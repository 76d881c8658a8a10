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


def test_logged_valid_acc_equals_eval_accuracy_on_the_same_records(tmp_path, byte_vocab, monkeypatch):
    """The last step's valid_acc is eval.py's accuracy of the saved checkpoint on the same records,
    decoded to the same completions (so the equality is not two zeros by chance)."""
    import sys

    ev = sys.modules["rwkv_bone.eval.evaluate"]  # the module (the package exports a function of that name)

    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    prepare(PrepareOptions(input=str(data), output=str(tmp_path / "sft"), tokenizer=str(byte_vocab),
                           prompt_field="question", response_field="answer", workers=1, progress=False))
    torch.set_num_threads(1)
    logged = []  # the validation's prediction rows, one list per validation
    original = ev.generate_answers

    def spy(*args, **kwargs):
        rows, made, seconds = original(*args, **kwargs)
        logged.append(rows)
        return rows, made, seconds

    monkeypatch.setattr(ev, "generate_answers", spy)
    assert run(parse_args(_flags(tmp_path, byte_vocab, "--valid_data", str(data), "--valid_every", "4",
                                 "--valid_task", "gsm8k", "--valid_limit", "3", "--valid_max_tokens", "6"))) == 0
    monkeypatch.setattr(ev, "generate_answers", original)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["valid_acc"] != "" for r in rows] == [False, False, False, True] and len(logged) == 1
    summary = evaluate(EvalOptions(model=str(tmp_path / "run" / "rwkv-0.pth"), data=str(data), task="gsm8k",
                                   tokenizer=str(byte_vocab), max_tokens=6, limit=3, output=str(tmp_path / "ev"),
                                   progress=False, quiet=True))
    assert summary["n"] == 3
    assert float(rows[3]["valid_acc"]) == pytest.approx(summary["accuracy"], abs=1e-6)
    predictions = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [p["completion"] for p in predictions] == [r["completion"] for r in logged[0]]
    assert [p["correct"] for p in predictions] == [r["correct"] for r in logged[0]]
    assert any(p["completion"].strip() for p in predictions)  # something was generated and compared

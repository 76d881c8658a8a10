"""eval.py end to end: outputs and their consistency, the loss task, every bad input, and a tiny
model trained by train.py to memorise a few answers that eval.py then scores."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_model
from rwkv_bone.cli import run_cli
from rwkv_bone.data.prepare import PrepareOptions, prepare
from rwkv_bone.data.tokenizer import WorldTokenizer
from rwkv_bone.eval.records import load_records
from rwkv_bone.peft import apply_peft, save_adapter

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
eval_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_cli)


@pytest.fixture(scope="module")
def byte_vocab(tmp_path_factory) -> Path:
    """World-format vocab of the 256 single bytes (id = byte + 1): 257 ids with end of document."""
    path = tmp_path_factory.mktemp("vocab") / "bytes.txt"
    path.write_text("\n".join(f"{b + 1} {bytes([b])!r} 1" for b in range(256)) + "\n", encoding="utf-8")
    return path


def run_eval(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(eval_cli.main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


GSM = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
       for a, b in ((1, 2), (3, 4), (10, 5), (7, 7), (2, 9))]


def test_prompts_use_make_datas_template(tmp_path):
    recs = load_records(str(write_jsonl(tmp_path / "t.jsonl", [
        GSM[0], {"query": "Q?", "response": "R. The answer is: 3"},
        {"problem": "P?", "solution": "\\boxed{2}"}, {"instruction": "Do", "input": "this", "output": "ok"}])))
    assert [r.prompt for r in recs] == ["User: What is 1 plus 2?\n\nAssistant:", "User: Q?\n\nAssistant:",
                                        "User: P?\n\nAssistant:", "User: Do\nthis\n\nAssistant:"]
    assert recs[0].response == " " + GSM[0]["answer"] and [r.id for r in recs] == [0, 1, 2, 3]
    custom = load_records(str(tmp_path / "t.jsonl"), prompt_template="Q: {prompt}\nA:", limit=1)
    assert [r.prompt for r in custom] == ["Q: What is 1 plus 2?\nA:"]
    named = load_records(str(write_jsonl(tmp_path / "n.jsonl", [{"q": "hi", "a": "#### 1"}])),
                         prompt_field="q", answer_field="a")
    assert named[0].prompt == "User: hi\n\nAssistant:" and named[0].answer == "#### 1"


def test_predictions_and_summary_agree_and_batching_changes_nothing(tmp_path, monkeypatch, capsys,
                                                                   byte_vocab, tiny_checkpoint):
    model = tiny_checkpoint("m.pth", vocab_size=260)
    data = write_jsonl(tmp_path / "test.jsonl", GSM)
    outs = []
    for bs in (1, 4):
        code, out, err = run_eval(monkeypatch, capsys, "--model", model, "--data", data, "--task", "gsm8k",
                                  "--output", tmp_path / f"o{bs}", "--tokenizer", byte_vocab,
                                  "--batch_size", bs, "--max_tokens", 6, "--no_progress")
        assert code == 0, err
        rows = [json.loads(x) for x in (tmp_path / f"o{bs}" / "predictions.jsonl").read_text().splitlines()]
        summary = json.loads((tmp_path / f"o{bs}" / "summary.json").read_text())
        assert [r["id"] for r in rows] == list(range(len(GSM)))
        assert [r["gold"] for r in rows] == ["3", "7", "15", "14", "11"]
        assert all(r["prompt"] == f"User: {g['question']}\n\nAssistant:" for r, g in zip(rows, GSM))
        assert summary["n"] == len(rows) and summary["correct"] == sum(r["correct"] for r in rows)
        assert summary["accuracy"] == summary["correct"] / summary["n"]
        lo, hi = summary["wilson_95"]
        assert 0 <= lo <= summary["accuracy"] <= hi <= 1 and summary["task"] == "gsm8k"
        assert summary["model"] == str(model) and summary["tokens_per_s"] > 0
        assert f"accuracy: {100 * summary['accuracy']:.2f}% ({summary['correct']}/{summary['n']})" in out
        outs.append([(r["completion"], r["prediction"]) for r in rows])
    assert outs[0] == outs[1]
    code, out, _ = run_eval(monkeypatch, capsys, "--model", model, "--data", data, "--task", "exact",
                            "--tokenizer", byte_vocab, "--max_tokens", 2, "--limit", 2, "--seed", 3, "--no_progress")
    assert code == 0 and "/2)" in out


def test_loss_task_matches_the_training_loss_on_jsonl_and_binidx(tmp_path, monkeypatch, capsys, byte_vocab,
                                                                tiny_checkpoint):
    from rwkv_bone.train.module import token_loss

    path = tiny_checkpoint("m.pth", vocab_size=260)
    data = write_jsonl(tmp_path / "sft.jsonl", GSM[:3])
    prepare(PrepareOptions(input=str(data), output=str(tmp_path / "sft"), tokenizer=str(byte_vocab),
                           prompt_field="question", response_field="answer", workers=1, progress=False))
    results = []
    for src in (data, tmp_path / "sft"):
        code, out, err = run_eval(monkeypatch, capsys, "--model", path, "--data", src, "--task", "loss",
                                  "--output", tmp_path / "loss", "--tokenizer", byte_vocab, "--batch_size", 2,
                                  "--no_progress")
        assert code == 0, err
        assert "perplexity" in out, out
        results.append(json.loads((tmp_path / "loss" / "summary.json").read_text()))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    # The obvious computation: each document alone, the training loss's masked sum.
    model = random_model(0, vocab_size=260).eval()
    tok = WorldTokenizer(str(byte_vocab))
    total, count = 0.0, 0
    for r in GSM[:3]:
        p = tok.encode(f"User: {r['question']}\n\nAssistant:")
        a = tok.encode(" " + r["answer"]) + [0]
        ids = torch.tensor([p + a])
        mask = torch.tensor([[0.0] * (len(p) - 1) + [1.0] * len(a)])
        with torch.no_grad():
            total += float(token_loss(model(ids[:, :-1]), ids[:, 1:], mask)) * len(a)
        count += len(a)
    assert results[0]["tokens"] == count
    assert results[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert results[0]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def _bad(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_inputs_are_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys, byte_vocab, tiny_checkpoint):
    model = tiny_checkpoint("m.pth", vocab_size=260)
    good = write_jsonl(tmp_path / "good.jsonl", GSM[:2])
    other = random_model(1, vocab_size=260, n_embd=64, dim_ffn=128)  # a different width
    apply_peft(other, "bone", bone_b=32)
    save_adapter(other, tmp_path / "wrong.pth")
    cases = [
        (["--data", tmp_path / "nope.jsonl"], "does not exist"),
        (["--data", _bad(tmp_path, "j.jsonl", json.dumps(GSM[0]) + "\n{oops\n")], "j.jsonl line 2: invalid JSON"),
        (["--data", _bad(tmp_path, "f.jsonl", json.dumps(GSM[0]) + "\n\n" + '{"question": "x"}\n')],
         "f.jsonl line 3: record has no 'answer' field"),
        (["--data", _bad(tmp_path, "k.jsonl", '{"foo": 1}\n')], "line 1: record has none of the field pairs"),
        (["--data", _bad(tmp_path, "e.jsonl", "\n\n")], "contains no records"),
        (["--data", _bad(tmp_path, "s.jsonl", '{"question": 3, "answer": "4"}\n')], "not a string"),
        (["--data", good, "--adapter", tmp_path / "wrong.pth"], None),
        (["--data", good, "--adapter", tmp_path / "missing.pth"], "does not exist"),
        (["--data", good, "--batch_size", 0], "--batch_size must be at least 1"),
        (["--data", good, "--limit", 0], "--limit must be at least 1"),
        (["--data", good, "--output", good], "is a file"),
        (["--data", good, "--prompt_template", "no slot"], "{prompt}"),
        # A run that fails after its output folder is named must leave that folder unwritten.
        (["--data", good, "--task", "loss", "--adapter", tmp_path / "wrong.pth", "--output", tmp_path / "x"], None),
    ]
    for extra, message in cases:
        code, out, err = run_eval(monkeypatch, capsys, "--model", model, "--task", "gsm8k", "--tokenizer",
                                  byte_vocab, "--no_progress", *extra)
        assert code == 2, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        if message:
            assert message in err, (message, err)
    code, out, err = run_eval(monkeypatch, capsys, "--model", tmp_path / "none.pth", "--data", good, "--task",
                              "gsm8k", "--no_progress")
    assert code == 2 and "--model" in err
    assert not (tmp_path / "x").exists()  # nothing half-written by a failed run


@pytest.mark.slow
def test_a_model_trained_to_memorise_answers_scores_them(tmp_path, monkeypatch, capsys, byte_vocab):
    """make_data -> train.py (from scratch) -> eval.py: four memorised answers score 4/4, a model
    that never saw them does not."""
    from rwkv_bone.train import parse_args, run

    recs = GSM[:4]
    data = write_jsonl(tmp_path / "train.jsonl", recs)
    prepare(PrepareOptions(input=str(data), output=str(tmp_path / "sft"), tokenizer=str(byte_vocab),
                           prompt_field="question", response_field="answer", workers=1, progress=False))
    torch.set_num_threads(1)
    assert run(parse_args(["--load_model", "", "--n_layer", "2", "--n_embd", "64", "--vocab_size", "260",
                           "--peft", "none", "--data_file", str(tmp_path / "sft"), "--data_type", "sft",
                           "--ctx_len", "64", "--micro_bsz", "4", "--epoch_steps", "120", "--lr_init", "1e-2",
                           "--lr_final", "1e-3", "--lr_schedule", "cosine", "--warmup_steps", "5",
                           "--proj_dir", str(tmp_path / "run"), "--accelerator", "cpu", "--precision", "fp32",
                           "--progress", "0"])) == 0
    code, out, err = run_eval(monkeypatch, capsys, "--model", tmp_path / "run" / "rwkv-0.pth", "--data", data,
                              "--task", "gsm8k", "--tokenizer", byte_vocab, "--output", tmp_path / "ev",
                              "--max_tokens", 40, "--no_progress")
    assert code == 0, err
    assert "accuracy: 100.00% (4/4)" in out, out
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["completion"].strip() for r in rows] == [r["answer"] for r in recs]


class Scripted(torch.nn.Module):
    """Greedy continuation = `script` (byte ids) then token 0, whatever the prompt."""

    def __init__(self, text: str):
        super().__init__()
        self.config = type("C", (), {"vocab_size": 260})()
        self.emb = torch.nn.Embedding(1, 1)
        self.script = [b + 1 for b in text.encode("utf-8")] + [0]

    def _logits(self, n):  # n = tokens made so far per row
        out = torch.zeros(len(n), 260)
        for row, k in enumerate(n):
            out[row, self.script[min(k, len(self.script) - 1)]] = 1.0
        return out

    def forward_with_state(self, idx, state):  # one "layer" whose state counts the tokens made
        return self._logits([0])[:, None].expand(1, idx.shape[1], 260), [(torch.zeros(1, 1),)]

    def step(self, tokens, state):
        made = state[0][0] + 1
        return self._logits([int(k) for k in made[:, 0]]), [(made,)]


def test_completion_ends_before_the_next_user_turn(tmp_path, byte_vocab):
    from rwkv_bone.eval.evaluate import EvalOptions, evaluate

    data = write_jsonl(tmp_path / "t.jsonl", GSM[:3])
    o = EvalOptions(model=str(byte_vocab), data=str(data), task="gsm8k", output=str(tmp_path / "o"),
                    tokenizer=str(byte_vocab), batch_size=2, progress=False, quiet=True)
    model = Scripted("1 + 2 = 3.\n#### 3\n\nUser: and now?\n\nAssistant: 42")
    summary = evaluate(o, model=model, tokenizer=WorldTokenizer(str(byte_vocab)))
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == ["1 + 2 = 3.\n#### 3"] * 3
    assert [r["correct"] for r in rows] == [True, False, False] and summary["correct"] == 1
    # Stopping there, not after max_tokens: far fewer tokens than 3 x 256 were generated.
    assert summary["tokens"] == 3 * len("1 + 2 = 3.\n#### 3\n\nUser:")


def test_a_bone_and_a_state_adapter_together_score_as_their_merged_model(tmp_path, monkeypatch, capsys,
                                                                          byte_vocab, tiny_checkpoint):
    from rwkv_bone.model import RWKV6

    base = tiny_checkpoint("base.pth", vocab_size=260)
    g = torch.Generator().manual_seed(1)
    bone = RWKV6.from_checkpoint(base)
    apply_peft(bone, "bone", bone_b=32)
    state = RWKV6.from_checkpoint(base)
    apply_peft(state, "state")
    with torch.no_grad():
        for m in (bone, state):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(bone, tmp_path / "bone.pth")
    save_adapter(state, tmp_path / "state.pth")
    spec = importlib.util.spec_from_file_location("merge_cli", ROOT / "merge.py")
    merge_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_cli)
    assert merge_cli.main(["--base", str(base), "--adapter", str(tmp_path / "bone.pth"), "--adapter",
                           str(tmp_path / "state.pth"), "--output", str(tmp_path / "merged.pth")]) == 0
    data = write_jsonl(tmp_path / "test.jsonl", GSM)
    completions = {}
    for name, flags in (("both", ["--model", base, "--adapter", tmp_path / "bone.pth", "--adapter",
                                  tmp_path / "state.pth"]),
                        ("merged", ["--model", tmp_path / "merged.pth"]), ("base", ["--model", base])):
        code, _, err = run_eval(monkeypatch, capsys, *flags, "--data", data, "--task", "gsm8k", "--output",
                                tmp_path / name, "--tokenizer", byte_vocab, "--batch_size", 3,
                                "--max_tokens", 8, "--no_progress")
        assert code == 0, err
        rows = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        completions[name] = [json.loads(r)["completion"] for r in rows]
    assert completions["both"] == completions["merged"]
    assert completions["both"] != completions["base"]

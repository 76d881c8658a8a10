"""The public record/template module: layouts, rendering, (tokens, mask) and RecordError."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rwkv_bone.data.prepare import PrepareOptions, prepare
from rwkv_bone.data.binidx import MMapIndexedDataset, load_masks
from rwkv_bone.data.records import (DEFAULT_PROMPT_TEMPLATE, RecordError, RecordFormat, encode_record,
                                    eval_layout, parse_json_record, unescape_template)
from rwkv_bone.data.tokenizer import WorldTokenizer
from rwkv_bone.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


def test_unescape_template_turns_typed_escapes_into_characters():
    assert unescape_template("User: {prompt}\\n\\nAssistant:") == DEFAULT_PROMPT_TEMPLATE
    assert unescape_template("a\\tb") == "a\tb"


@pytest.mark.parametrize("rec, prompt, body", [
    ({"text": "hi"}, None, "hi"),
    ({"query": "q", "response": "r"}, "User: q\n\nAssistant:", " r"),
    ({"instruction": "i", "input": "x", "output": "o"}, "User: i\nx\n\nAssistant:", " o"),
    ({"instruction": "i", "output": "o"}, "User: i\n\nAssistant:", " o"),
])
def test_record_format_renders_each_make_data_layout(rec, prompt, body):
    assert RecordFormat().render(rec) == (prompt, body)


@pytest.mark.parametrize("rec, fields", [
    ({"question": "q", "answer": "a"}, ("question", "answer", None)),
    ({"query": "q", "response": "a"}, ("query", "response", None)),
    ({"problem": "q", "solution": "a"}, ("problem", "solution", None)),
    ({"instruction": "q", "output": "a"}, ("instruction", "output", "input")),
])
def test_eval_layout_finds_each_known_pair(rec, fields):
    assert eval_layout(rec) == fields


def test_eval_layout_names_the_missing_half():
    with pytest.raises(RecordError, match="no 'answer' field"):
        eval_layout({"question": "q"})
    with pytest.raises(RecordError, match="not a string"):
        eval_layout({"question": 3, "answer": "a"})


def test_parse_json_record_rejects_bad_lines_with_record_error():
    with pytest.raises(RecordError, match="invalid JSON"):
        parse_json_record("{oops")
    with pytest.raises(RecordError, match="must be a JSON object"):
        parse_json_record("[1]")
    e = RecordError("bad", 7)
    assert str(e) == "bad" and e.line == 7


def test_encode_record_masks_the_prompt_and_ends_with_eod(tok):
    tokens, mask = encode_record(tok, "User: q\n\nAssistant:", " r")
    n = len(tok.encode("User: q\n\nAssistant:"))
    assert tokens[-1] == 0 and tokens.dtype == np.int64
    assert mask.tolist() == [0] * n + [1] * (len(tokens) - n)
    tokens, mask = encode_record(tok, None, "plain")
    assert mask.all() and tokens.tolist() == tok.encode("plain") + [0]


def test_encode_record_equals_what_make_data_writes(tmp_path, tok):
    recs = [{"query": "What is 2+2?", "response": "4"}, {"text": "free text 的"},
            {"instruction": "Add", "input": "1 2", "output": "3"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare(PrepareOptions(str(src), str(tmp_path / "out"), workers=1, progress=False))
    data = MMapIndexedDataset(str(tmp_path / "out"))
    masks = load_masks(str(tmp_path / "out"), data)
    for i, rec in enumerate(recs):
        tokens, mask = encode_record(tok, *RecordFormat().render(rec))
        assert data.get(i).tolist() == tokens.tolist() and masks.get(i).tolist() == mask.tolist()


def test_unpaired_surrogate_is_a_record_error_not_a_crash(tok):
    with pytest.raises(RecordError, match="unpaired surrogate"):
        encode_record(tok, None, "a\ud800b")


def test_missing_placeholder_is_a_user_error():
    from rwkv_bone.data.records import check_templates

    with pytest.raises(UserError, match="must contain {prompt}"):
        check_templates("User:")

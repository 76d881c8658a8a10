"""Evaluation records from a .jsonl file, with prompts rendered exactly as make_data trains them.

Recognised layouts (first match wins, or --prompt_field / --answer_field name the fields):
    GSM8K       {"question", "answer"}      gold: after "####"
    MetaMathQA  {"query", "response"}       gold: after "The answer is:"
    MATH        {"problem", "solution"}     gold: the last \\boxed{...}
    alpaca      {"instruction", "input", "output"}   ("input" optional, joined after a newline)
The gold answer is the task's extraction applied to the answer field (rwkv_bone.eval.answers),
which finds exactly those markers. The prompt goes through make_data's own record parser
(rwkv_bone.data.records) with its template (--prompt_template), so a model is asked the way it
was trained: "User: {question}\\n\\nAssistant:" by default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..data.records import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_RESPONSE_TEMPLATE, QA_LAYOUTS,
                            RecordError, check_templates, eval_format, parse_json_record)
from ..errors import UserError

LAYOUTS = QA_LAYOUTS
__all__ = ["DEFAULT_PROMPT_TEMPLATE", "LAYOUTS", "Record", "load_records"]


@dataclass
class Record:
    id: int          # 0-based record index in the file (blank lines skipped)
    line: int        # 1-based line number, for messages
    prompt: str      # rendered prompt, ends like make_data's template ("...Assistant:")
    answer: str      # the raw answer field (worked solution)
    response: str    # the answer as make_data renders the trained response (" {response}")


def load_records(path: str, *, prompt_field: Optional[str] = None, answer_field: Optional[str] = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, limit: Optional[int] = None) -> list[Record]:
    """Every record of `path` (the first `limit`), in file order; UserError naming the file and
    line for anything unusable."""
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; check the path")
    if not os.path.isfile(path):
        raise UserError(f"data {path} is not a file; pass a .jsonl file")
    check_templates(prompt_template)
    records: list[Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path} line {lineno}: not valid UTF-8; re-encode the file as UTF-8") from None
            try:
                rec = parse_json_record(text)
                fmt, af = eval_format(rec, prompt_field, answer_field, prompt_template,
                                      DEFAULT_RESPONSE_TEMPLATE)
                prompt, response = fmt.render(rec)
            except RecordError as e:
                raise UserError(f"{path} line {lineno}: {e}") from None
            assert prompt is not None
            records.append(Record(len(records), lineno, prompt, rec[af], response))
    if not records:
        raise UserError(f"{path} contains no records; pass a .jsonl file with one JSON object per line")
    return records

"""Evaluation records from a .jsonl file, with prompts rendered exactly as make_data trains them.

Recognised layouts (first match wins, or --prompt_field / --answer_field name the fields):
    GSM8K       {"question", "answer"}      gold: after "####"
    MetaMathQA  {"query", "response"}       gold: after "The answer is:"
    MATH        {"problem", "solution"}     gold: the last \\boxed{...}
    alpaca      {"instruction", "input", "output"}   ("input" optional, joined after a newline)
The gold answer is the task's extraction applied to the answer field (rwkv_bone.eval.answers),
which finds exactly those markers. The prompt goes through make_data's own record parser
(rwkv_bone.data.prepare) with its template (--prompt_template), so a model is asked the way it
was trained: "User: {question}\\n\\nAssistant:" by default.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from ..data.prepare import DEFAULT_PROMPT_TEMPLATE, PrepareOptions, _Bad, _Encoder
from ..errors import UserError

LAYOUTS = (("question", "answer"), ("query", "response"), ("problem", "solution"))


@dataclass
class Record:
    id: int          # 0-based record index in the file (blank lines skipped)
    line: int        # 1-based line number, for messages
    prompt: str      # rendered prompt, ends like make_data's template ("...Assistant:")
    answer: str      # the raw answer field (worked solution)
    response: str    # the answer as make_data renders the trained response (" {response}")


def _layout(rec: dict, prompt_field: Optional[str], answer_field: Optional[str]
            ) -> tuple[str, str, Optional[str]]:
    """(prompt field, answer field, alpaca input field or None) for one record."""
    if prompt_field or answer_field:
        # Named fields win; an unnamed one comes from the first known layout the record has.
        known = LAYOUTS + (("instruction", "output"),)
        found = next(((p, a) for p, a in known if p in rec and a in rec), ("question", "answer"))
        pf, af = prompt_field or found[0], answer_field or found[1]
        return pf, af, ("input" if pf == "instruction" else None)
    for p, a in LAYOUTS:
        if p in rec and a in rec:
            return p, a, None
    if "instruction" in rec and "output" in rec:
        return "instruction", "output", "input"
    for p, a in LAYOUTS + (("instruction", "output"),):  # half a layout: name the missing half
        if p in rec or a in rec:
            raise _Bad(f"record has no '{a if p in rec else p}' field (--prompt_field / --answer_field "
                       "name the question and answer fields)")
    raise _Bad("record has none of the field pairs question/answer, query/response, "
               "problem/solution, instruction/output (name yours with --prompt_field and --answer_field)")


def load_records(path: str, *, prompt_field: Optional[str] = None, answer_field: Optional[str] = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, limit: Optional[int] = None) -> list[Record]:
    """Every record of `path` (the first `limit`), in file order; UserError naming the file and
    line for anything unusable."""
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; check the path")
    if not os.path.isfile(path):
        raise UserError(f"data {path} is not a file; pass a .jsonl file")
    if "{prompt}" not in prompt_template:
        raise UserError("--prompt_template must contain {prompt}")
    records: list[Record] = []
    encoders: dict[tuple, _Encoder] = {}
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
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise _Bad(f"invalid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise _Bad(f"a record must be a JSON object {{...}}, not {type(rec).__name__}")
                pf, af, inf = _layout(rec, prompt_field, answer_field)
                for name in (pf, af):
                    if name not in rec:
                        raise _Bad(f"record has no '{name}' field (--prompt_field / --answer_field name "
                                   "the question and answer fields)")
                    if not isinstance(rec[name], str):
                        raise _Bad(f"field '{name}' is {type(rec[name]).__name__}, not a string")
                key = (pf, af, inf)
                if key not in encoders:
                    opts = PrepareOptions(input=path, output="", prompt_template=prompt_template,
                                          format="alpaca" if inf else "qa", prompt_field=pf,
                                          response_field=af, instruction_field=pf, output_field=af,
                                          input_field=inf or "input")
                    encoders[key] = _Encoder(None, opts, "jsonl", None)  # its parser only, no tokenizer
                prompt, response = encoders[key]._parse(text)
            except _Bad as e:
                raise UserError(f"{path} line {lineno}: {e.args[0]}") from None
            assert prompt is not None
            records.append(Record(len(records), lineno, prompt, rec[af], response))
    if not records:
        raise UserError(f"{path} contains no records; pass a .jsonl file with one JSON object per line")
    return records

"""Records and prompt templates: one place that turns a JSON record into (prompt, response) text
and then into tokens and a loss mask. make_data (data/prepare.py), evaluation (eval/records.py,
eval/loss.py) and training validation (train/validate.py) all go through here, so a model is
scored and validated on exactly the text it was trained on.

Record layouts (field names):
    text                               {"text"}                          -> trained as a whole
    MetaMathQA                         {"query", "response"}
    GSM8K                              {"question", "answer"}
    MATH                               {"problem", "solution"}
    alpaca                             {"instruction", "input", "output"}  ("input" optional; when
                                       non-empty it joins the instruction after a newline)

Instruction records use the RWKV chat convention
    prompt   = "User: {prompt}\\n\\nAssistant:"      (DEFAULT_PROMPT_TEMPLATE)
    response = " {response}"                        (DEFAULT_RESPONSE_TEMPLATE)
The prompt and the response are tokenised separately and concatenated, so the mask boundary is a
token boundary: mask 0 on prompt tokens, 1 on response tokens and on the final end-of-document 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError

DEFAULT_PROMPT_TEMPLATE = "User: {prompt}\n\nAssistant:"
DEFAULT_RESPONSE_TEMPLATE = " {response}"
EOD_ID = 0
FORMATS = ("auto", "text", "qa", "alpaca")
# (prompt field, answer field) pairs evaluation recognises, in the order it tries them; alpaca's
# instruction/output (+ input) comes after them.
QA_LAYOUTS = (("question", "answer"), ("query", "response"), ("problem", "solution"))
ALPACA_LAYOUT = ("instruction", "output", "input")


class RecordError(Exception):
    """One record that cannot be used. `line` (when known) is the 1-based line it starts on;
    callers report it as '<file> line <n>: <message>'."""

    def __init__(self, message: str, line: Optional[int] = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line

    def __str__(self) -> str:
        return self.message


def unescape_template(s: str) -> str:
    """Let templates (and prompts) typed in a shell use \\n and \\t."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def check_templates(prompt_template: str, response_template: Optional[str] = None) -> None:
    """UserError unless the templates hold their placeholders."""
    if "{prompt}" not in prompt_template:
        raise UserError("--prompt_template must contain {prompt}")
    if response_template is not None and "{response}" not in response_template:
        raise UserError("--response_template must contain {response}")


def render_prompt(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)


def render_response(template: str, response: str) -> str:
    return template.replace("{response}", response)


def parse_json_record(text: str | bytes) -> dict:
    """The JSON object on one line; RecordError for invalid JSON or a non-object."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"a record must be a JSON object {{...}}, not {type(rec).__name__}")
    return rec


@dataclass(frozen=True, kw_only=True)
class RecordFormat:
    """How make_data reads one JSON record: its format (auto | text | qa | alpaca), field names
    and templates. `render` gives (rendered prompt or None for plain text, rendered body).
    make_data's PrepareOptions extends it (these fields are its record options)."""

    format: str = "auto"
    text_field: str = "text"
    prompt_field: str = "query"
    response_field: str = "response"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    response_template: str = DEFAULT_RESPONSE_TEMPLATE

    def _field(self, rec: dict, name: str, optional: bool = False) -> str:
        value = rec.get(name)
        if value is None and optional:
            return ""
        if name not in rec:
            raise RecordError(f"missing field '{name}' (other names: --text_field, --prompt_field, "
                              "--response_field, ...; or another --format)")
        if not isinstance(value, str):
            raise RecordError(f"field '{name}' is {type(value).__name__}, not a string")
        return value

    def render(self, rec: dict) -> tuple[Optional[str], str]:
        """(prompt or None, body) of one parsed record, templates applied."""
        fmt = self.format
        if fmt == "auto":
            if self.text_field in rec:
                fmt = "text"
            elif self.prompt_field in rec and self.response_field in rec:
                fmt = "qa"
            elif self.instruction_field in rec and self.output_field in rec:
                fmt = "alpaca"
            else:
                raise RecordError(f"record has no '{self.text_field}' field, nor '{self.prompt_field}' + "
                                  f"'{self.response_field}', nor '{self.instruction_field}' + "
                                  f"'{self.output_field}' (other names: --text_field, "
                                  "--prompt_field, --response_field, ...)")
        if fmt == "text":
            return None, self._field(rec, self.text_field)
        if fmt == "qa":
            prompt, response = self._field(rec, self.prompt_field), self._field(rec, self.response_field)
        else:
            prompt = self._field(rec, self.instruction_field)
            extra = self._field(rec, self.input_field, optional=True)
            prompt = prompt + "\n" + extra if extra else prompt
            response = self._field(rec, self.output_field)
        return (render_prompt(self.prompt_template, prompt),
                render_response(self.response_template, response))

    def render_line(self, text: str) -> tuple[Optional[str], str]:
        """`render` of one JSON line."""
        return self.render(parse_json_record(text))


def eval_layout(rec: dict, prompt_field: Optional[str] = None, answer_field: Optional[str] = None
                ) -> tuple[str, str, Optional[str]]:
    """(prompt field, answer field, alpaca input field or None) of an evaluation record: the named
    fields, else the first known layout the record has. RecordError when it has none."""
    known = QA_LAYOUTS + (ALPACA_LAYOUT[:2],)
    if prompt_field or answer_field:
        # Named fields win; an unnamed one comes from the first known layout the record has.
        found = next(((p, a) for p, a in known if p in rec and a in rec), QA_LAYOUTS[0])
        pf, af = prompt_field or found[0], answer_field or found[1]
        layout = (pf, af, ALPACA_LAYOUT[2] if pf == ALPACA_LAYOUT[0] else None)
    else:
        layout = next(((p, a, ALPACA_LAYOUT[2] if (p, a) == ALPACA_LAYOUT[:2] else None)
                       for p, a in known if p in rec and a in rec), None)
        if layout is None:
            for p, a in known:  # half a layout: name the missing half
                if p in rec or a in rec:
                    raise RecordError(f"record has no '{a if p in rec else p}' field (--prompt_field / "
                                      "--answer_field name the question and answer fields)")
            raise RecordError("record has none of the field pairs question/answer, query/response, "
                              "problem/solution, instruction/output (name yours with --prompt_field "
                              "and --answer_field)")
    for name in layout[:2]:
        if name not in rec:
            raise RecordError(f"record has no '{name}' field (--prompt_field / --answer_field name "
                              "the question and answer fields)")
        if not isinstance(rec[name], str):
            raise RecordError(f"field '{name}' is {type(rec[name]).__name__}, not a string")
    return layout


def eval_format(rec: dict, prompt_field: Optional[str] = None, answer_field: Optional[str] = None,
                prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                response_template: str = DEFAULT_RESPONSE_TEMPLATE) -> tuple[RecordFormat, str]:
    """(the RecordFormat make_data would use for this evaluation record, its answer field)."""
    pf, af, inf = eval_layout(rec, prompt_field, answer_field)
    fmt = RecordFormat(format="alpaca" if inf else "qa", prompt_field=pf, response_field=af,
                       instruction_field=pf, output_field=af, input_field=inf or "input",
                       prompt_template=prompt_template, response_template=response_template)
    return fmt, af


def encode_text(tok, text: str, tokenizer_name: Optional[str] = None) -> list[int]:
    """Token ids of `text`. RecordError for text that is not valid Unicode (the record's fault);
    UserError when valid text fails (the tokenizer's fault: it stops the run)."""
    try:
        return tok.encode(text)
    except Exception as exc:
        raise encode_failure(text, exc, tokenizer_name) from None


def encode_failure(text: str, exc: BaseException, tokenizer_name: Optional[str]) -> Exception:
    """The exception to raise when the tokenizer failed on `text` (see encode_text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return RecordError(f"text contains an unpaired surrogate ({text[e.start]!r}) that is "
                           "not valid Unicode")
    name = tokenizer_name or "RWKV World (rwkv_vocab_v20230424)"
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return UserError(f"the tokenizer {name} failed to encode the text ({reason}); fix the "
                     "tokenizer file or choose another --tokenizer")


def assemble(prompt_ids: Optional[Sequence[int]], body_ids: Sequence[int],
             dtype: np.dtype = np.dtype(np.int64)) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of one document: prompt + body + end-of-document 0; mask 0 on the prompt."""
    n_prompt = len(prompt_ids) if prompt_ids else 0
    tokens = np.empty(n_prompt + len(body_ids) + 1, dtype=dtype)
    tokens[:n_prompt] = prompt_ids or []
    tokens[n_prompt:-1] = body_ids
    tokens[-1] = EOD_ID
    mask = np.ones(tokens.size, dtype=np.uint8)
    mask[:n_prompt] = 0
    return tokens, mask


def encode_record(tok, prompt: Optional[str], body: str, dtype: np.dtype = np.dtype(np.int64),
                  tokenizer_name: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of one rendered record, exactly as make_data writes it."""
    p_ids = encode_text(tok, prompt, tokenizer_name) if prompt is not None else None
    return assemble(p_ids, encode_text(tok, body, tokenizer_name), dtype)

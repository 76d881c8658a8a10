"""Preference pairs for DPO: make_data.py turns prompt/chosen/rejected records into a pair dataset.

Records (one JSON object per line), both forms HF TRL's preference datasets use:
    {"prompt": "...", "chosen": "...", "rejected": "..."}                        (strings)
    {"prompt": [msgs] (optional), "chosen": [msgs], "rejected": [msgs]}          (conversational)
where msgs are {"role": "user"|"assistant"|"system", "content": "..."}; the response is the last
assistant turn of chosen / rejected, and the turns before it (after "prompt"'s, if given) are the
conversation it answers.

Rendering is the SFT path's (data/prepare.py): the prompt is rendered with --prompt_template
("User: {prompt}\\n\\nAssistant:"), the response with --response_template (" {response}"), each
tokenised alone, and the response is followed by the end-of-document token 0. Earlier turns of a
conversation are rendered the same way and joined by "\\n\\n".

Output (PREFIX): PREFIX.bin/.idx and PREFIX.mask.bin/.idx as make_data writes for SFT, with pair i
as documents 2i (prompt + chosen) and 2i + 1 (prompt + rejected), mask 1 on the response tokens;
PREFIX.pairs.json {"pairs": N, ...} marks it a pair dataset (train.py --data_type pairs).
A bad record is one sentence naming its line, and nothing is written.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..atomic import text_atomic
from ..errors import UserError
from .binidx import BinIdxWriter, split_prefix
from .tokenizer import EOD_ID, load_tokenizer, token_dtype

PAIR_FIELDS = ("chosen", "rejected")


def first_record(path: str) -> dict | None:
    """The first JSON object of a .jsonl file, or None (not JSON, empty)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    rec = json.loads(raw.decode("utf-8-sig"))
                    return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None
    return None


def is_preference_file(path: str) -> bool:
    rec = first_record(path) if path.endswith(".jsonl") else None
    return rec is not None and all(k in rec for k in PAIR_FIELDS)


class _Bad(Exception):
    pass


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"'{name}' must be a non-empty string or a non-empty list of messages")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _Bad(f"every message of '{name}' needs a 'role' and a string 'content'")
    return value


def _render_turns(turns: list[dict], pt: str, rt: str) -> str:
    """Earlier turns as the SFT template renders them, ending where the answer starts."""
    parts, user = [], []
    for m in turns:
        if m["role"] == "assistant":
            parts.append(pt.replace("{prompt}", "\n\n".join(user)) + rt.replace("{response}", m["content"]))
            user = []
        else:
            user.append(m["content"])
    parts.append(pt.replace("{prompt}", "\n\n".join(user)))
    return "\n\n".join(parts)


def render_pair(rec: dict, pt: str, rt: str) -> tuple[str, str, str]:
    """(prompt text, chosen response text, rejected response text), templates applied."""
    for name in ("prompt", *PAIR_FIELDS):
        if name not in rec and name != "prompt":
            raise _Bad(f"record has no '{name}' field (preference records need prompt, chosen and rejected)")
    if all(isinstance(rec[k], str) for k in PAIR_FIELDS):
        if not isinstance(rec.get("prompt"), str):
            raise _Bad("record has no string 'prompt' field (preference records need prompt, chosen and rejected)")
        prompt, responses = pt.replace("{prompt}", rec["prompt"]), [rec[k] for k in PAIR_FIELDS]
    else:
        convs = [_messages(rec[k], k) for k in PAIR_FIELDS]
        lead = _messages(rec["prompt"], "prompt") if isinstance(rec.get("prompt"), list) else []
        if isinstance(rec.get("prompt"), str):
            lead = [{"role": "user", "content": rec["prompt"]}]
        histories, responses = [], []
        for name, conv in zip(PAIR_FIELDS, convs):
            last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
            if last is None:
                raise _Bad(f"'{name}' has no assistant message to train on")
            histories.append(lead + conv[:last])
            responses.append(conv[last]["content"])
        if histories[0] != histories[1]:
            raise _Bad("chosen and rejected answer different conversations; they must share the prompt")
        if not histories[0]:
            raise _Bad("the conversation has no user turn before the answer")
        prompt = _render_turns(histories[0], pt, rt)
    for name, text in zip(PAIR_FIELDS, responses):
        if not text.strip():
            raise _Bad(f"the '{name}' response is empty")
    return prompt, rt.replace("{response}", responses[0]), rt.replace("{response}", responses[1])


def prepare_pairs(path: str, output: str, tokenizer: str | None = None,
                  prompt_template: str = "User: {prompt}\n\nAssistant:",
                  response_template: str = " {response}") -> int:
    """Write the pair dataset of `path` to `output` (see the module docstring); returns the pairs."""
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    prefix = split_prefix(output)
    pairs = 0
    with BinIdxWriter(prefix, dtype) as tw, BinIdxWriter(prefix + ".mask", np.uint8) as mw:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    try:
                        rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                    except UnicodeDecodeError:
                        raise _Bad("not valid UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise _Bad(f"invalid JSON ({e.msg}, column {e.colno})") from None
                    if not isinstance(rec, dict):
                        raise _Bad(f"a record must be a JSON object, not {type(rec).__name__}")
                    prompt, chosen, rejected = render_pair(rec, prompt_template, response_template)
                except _Bad as e:
                    raise UserError(f"{path} line {lineno}: {e}; fix or remove the record (nothing was written)") from None
                p_ids = tok.encode(prompt)
                for text in (chosen, rejected):
                    r_ids = tok.encode(text) + [EOD_ID]
                    tw.add(np.asarray(p_ids + r_ids, dtype=dtype))
                    mw.add(np.asarray([0] * len(p_ids) + [1] * len(r_ids), dtype=np.uint8))
                pairs += 1
        if not pairs:
            raise UserError(f"{path} holds no records; nothing was written")
        text_atomic(json.dumps({"pairs": pairs, "source": os.path.basename(path),
                                "layout": "documents 2i chosen, 2i+1 rejected"}) + "\n", prefix + ".pairs.json")
    return pairs


__all__ = ["is_preference_file", "render_pair", "prepare_pairs"]

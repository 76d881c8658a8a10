"""The RWKV World vocab file: reading it, id <-> bytes tables and the literal reference encoder.

Shared by the Python encoder (tokenizer.py) and the pyrwkv-tokenizer wrapper (world_native.py), which
checks the native ids against `WorldVocab.encode_reference`. The file format and the encoding rule
are described in tokenizer.py's docstring.
"""
from __future__ import annotations

import ast
import importlib.util
import os

from ..errors import UserError

WORLD_VOCAB_NAME = "rwkv_vocab_v20230424.txt"


def world_vocab_path() -> str:
    """Path of the World vocab file inside the installed `rwkv` package."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the RWKV World vocab comes with the `rwkv` package; install it "
                        "(pip install rwkv) or pass --tokenizer path/to/tokenizer.json")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, WORLD_VOCAB_NAME)
        if os.path.isfile(path):
            return path
    raise UserError(f"the installed rwkv package has no {WORLD_VOCAB_NAME}; reinstall it "
                    "(pip install -U rwkv) or pass --tokenizer path/to/tokenizer.json")


def _literal(text: str) -> str | bytes:
    """The value of one vocab literal. Most are quoted strings without escapes (no backslash and no
    inner quote of the same kind), whose value is the text between the quotes; that shortcut makes
    loading the 65529-line vocab ~6x faster than literal_eval on every line."""
    q = text[:1]
    if len(text) >= 2 and q in ("'", '"') and text[-1] == q and "\\" not in text \
            and q not in text[1:-1]:
        return text[1:-1]
    return ast.literal_eval(text)


def load_world_vocab(path: str) -> list[bytes]:
    """Read a World vocab file into a list indexed by id (index 0, end of document, is b"")."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer vocab {path} not found; check the --tokenizer path")
    table: dict[int, bytes] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                idx, nbytes = int(line[:first]), int(line[last + 1:])
                lit = _literal(line[first + 1:last])
            except (ValueError, SyntaxError) as e:
                raise UserError(f"{path} line {lineno}: not an 'ID LITERAL BYTELEN' vocab line "
                                f"({e}); is this an RWKV World vocab file?") from None
            tok = lit.encode("utf-8") if isinstance(lit, str) else lit
            if not isinstance(tok, bytes) or len(tok) != nbytes or not tok:
                raise UserError(f"{path} line {lineno}: token literal does not match its byte "
                                f"length {nbytes}; the vocab file is corrupt")
            if idx <= 0 or idx in table:
                raise UserError(f"{path} line {lineno}: token id {idx} is 0 or repeated; "
                                "the vocab file is corrupt")
            table[idx] = tok
    if not table:
        raise UserError(f"tokenizer vocab {path} is empty")
    vocab = [b""] * (max(table) + 1)
    for idx, tok in table.items():
        vocab[idx] = tok
    singles = {t for t in table.values() if len(t) == 1}
    if len(singles) != 256:
        raise UserError(f"tokenizer vocab {path} lacks {256 - len(singles)} of the 256 single-byte "
                        "tokens, so some texts cannot be encoded; use a complete World vocab")
    return vocab


class WorldVocab:
    """One World vocab file: id -> bytes, bytes -> id, longest token. Loaded once per process."""

    def __init__(self, path: str):
        self.path = path
        self.id_to_bytes = load_world_vocab(path)
        # Later ids win for duplicate byte strings, as in the official tokenizer.
        self.bytes_to_id = {t: i for i, t in enumerate(self.id_to_bytes) if t}
        self.max_len = max(len(t) for t in self.id_to_bytes)
        # Longest token starting with each 1- or 2-byte prefix: lengths above it cannot match, so
        # the reference skips them (e.g. after "a" at most 16 bytes, not 128). Absent prefix: 1.
        self.longest_from: dict[bytes, int] = {}
        for tok in self.bytes_to_id:
            head = tok[:2]
            self.longest_from[head] = max(self.longest_from.get(head, 1), len(tok))

    def encode_reference(self, data: bytes) -> list[int]:
        """The definition, literally: at each position try every length, longest first (only
        lengths some token starting with the next two bytes has). Slow; the source of truth."""
        ids, i, table, bound = [], 0, self.bytes_to_id, self.longest_from
        while i < len(data):
            for length in range(min(bound.get(data[i:i + 2], 1), len(data) - i), 0, -1):
                tid = table.get(data[i:i + length])
                if tid is not None:
                    ids.append(tid)
                    i += length
                    break
        return ids


_VOCABS: dict[str, WorldVocab] = {}


def world_vocab(path: str | None = None) -> WorldVocab:
    """The (cached) WorldVocab of `path` (default: the World vocab of the rwkv package)."""
    path = os.path.abspath(path or world_vocab_path())
    if path not in _VOCABS:
        _VOCABS[path] = WorldVocab(path)
    return _VOCABS[path]

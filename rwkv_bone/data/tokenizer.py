"""Tokenisers for make_data: the RWKV World tokenizer (own implementation) and HF tokenizer.json.

RWKV World tokenizer
--------------------
The vocab file (`rwkv_vocab_v20230424.txt`, shipped in the `rwkv` package) has one token per line,
`ID LITERAL BYTELEN`, LITERAL a Python str (UTF-8 encoded) or bytes literal. Ids run 1..65529; id 0 is
the end-of-document token and has no bytes. Every single byte b is a token, so encoding always
progresses. Encoding is greedy longest match over the UTF-8 bytes of the text:

    i = 0
    while i < len(b):  t = the longest vocab token with b[i:i+len(t)] == t;  emit id(t);  i += len(t)

Two exact speed-ups (the result is identical to the definition above, which `encode_reference`
implements literally and the tests compare against):

1. The byte trie is compiled into one regular expression, `a(?:b(?:c|)|d)|...`: an alternation over
   the children of each trie node, with an empty alternative after nodes that end a token. The regex
   engine tries the deeper alternatives first and falls back to the empty one, which is exactly
   "longest match", and runs in C.
2. Safe split points. If no vocab token contains the byte pair (x, y) anywhere inside it, no token
   can straddle a position whose left byte is x and right byte is y, so greedy matching on the whole
   text equals greedy matching on each piece between such positions. In the World vocab a letter or
   digit is never followed by a space or punctuation inside a token, so pieces are mostly words
   (" tower", ",", "\\n\\n"); they repeat (Zipf), so each short piece's ids are cached.
   The pair table is built from the vocab itself, so this holds for any vocab file of this format.

make_data encodes the World vocab with pyrwkv-tokenizer (Rust) instead, after checking it against
`encode_reference` at start; see world_native.py. This file stays the reference and the fallback.

Hugging Face
------------
`HFTokenizer(path)` wraps any `tokenizer.json` through the `tokenizers` package; special tokens are
not added (make_data appends the end-of-document id 0 itself, whatever that id means in that vocab).
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Protocol, Sequence

import numpy as np

from ..errors import UserError
from .world_vocab import WORLD_VOCAB_NAME, WorldVocab, load_world_vocab, world_vocab, world_vocab_path

EOD_ID = 0

# Pieces longer than this are encoded but not cached (long CJK runs, space runs): they rarely repeat.
_MAX_CACHED_PIECE = 48
_CACHE_LIMIT = 1 << 18


__all__ = ["EOD_ID", "WORLD_VOCAB_NAME", "HFTokenizer", "Tokenizer", "WorldTokenizer", "WorldVocab",
           "load_tokenizer", "load_world_vocab", "token_dtype", "world_vocab", "world_vocab_path"]


class Tokenizer(Protocol):
    """What make_data needs from a tokeniser."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _trie_regex(tokens: Sequence[bytes]) -> re.Pattern[bytes]:
    """Compile the byte trie of `tokens` into a regex whose match at i is the longest token at i."""
    END = -1
    root: dict[int, dict] = {}
    for tok in tokens:
        node = root
        for byte in tok:
            node = node.setdefault(byte, {})
        node[END] = {}

    def alternation(node: dict[int, dict]) -> bytes:
        parts = []
        for byte in sorted(k for k in node if k != END):
            child = node[byte]
            lit = re.escape(bytes([byte]))
            if len(child) == 1 and END in child:
                parts.append(lit)  # a leaf: the token ends here
            else:
                tail = b"|)" if END in child else b")"  # empty alternative = stop at this token
                parts.append(lit + b"(?:" + alternation(child) + tail)
        return b"|".join(parts)

    return re.compile(alternation(root), re.DOTALL)


class _WorldTables:
    """Everything the fast Python encoder derives from one vocab file; built once per process."""

    def __init__(self, path: str):
        vocab = world_vocab(path)
        self.path = path
        self.vocab = vocab
        self.id_to_bytes, self.bytes_to_id, self.max_len = vocab.id_to_bytes, vocab.bytes_to_id, vocab.max_len
        self.regex = _trie_regex(list(self.bytes_to_id))
        inner = np.zeros((256, 256), dtype=bool)  # inner[x, y]: pair (x, y) occurs inside a token
        for tok in self.bytes_to_id:
            if len(tok) > 1:
                arr = np.frombuffer(tok, dtype=np.uint8)
                inner[arr[:-1], arr[1:]] = True
        self.split_after = (~inner).reshape(-1)  # (65536,) indexed by x * 256 + y


_TABLES: dict[str, _WorldTables] = {}


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest byte match; ids identical to the official one."""

    def __init__(self, vocab_path: str | None = None):
        path = os.path.abspath(vocab_path or world_vocab_path())
        if path not in _TABLES:
            _TABLES[path] = _WorldTables(path)
        self._t = _TABLES[path]
        self.vocab_path = path
        self.vocab_size = len(self._t.id_to_bytes)  # 65530 for the shipped vocab: max id + 1
        self._cache: dict[bytes, list[int]] = {}

    # Rebuilt from the path in spawned worker processes (forked ones inherit the tables).
    def __getstate__(self) -> dict:
        return {"vocab_path": self.vocab_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_path"])

    def _encode_piece(self, piece: bytes) -> list[int]:
        return list(map(self._t.bytes_to_id.__getitem__, self._t.regex.findall(piece)))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (fast path: split at safe points, cache short pieces)."""
        n = len(data)
        if n == 0:
            return []
        arr = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)  # (n,)
        pairs = (arr[:-1] << 8) | arr[1:]  # (n-1,) byte pair left|right of each inner position
        cuts = (np.flatnonzero(self._t.split_after[pairs]) + 1).tolist()
        out: list[int] = []
        append, extend, cache, encode_piece = out.append, out.extend, self._cache, self._encode_piece
        single = self._t.bytes_to_id.get
        start = 0
        for end in cuts + [n]:
            piece = data[start:end]
            # A piece that is itself a token is that one token: nothing longer fits inside it,
            # and nothing crosses its ends. This is the common case (" tower", ",").
            tid = single(piece)
            if tid is not None:
                append(tid)
            else:
                ids = cache.get(piece)
                if ids is None:
                    ids = encode_piece(piece)
                    if end - start <= _MAX_CACHED_PIECE:
                        if len(cache) >= _CACHE_LIMIT:
                            cache.clear()  # bounded memory; common pieces come back quickly
                        cache[piece] = ids
                extend(ids)
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (UTF-8 bytes, greedy longest match). No end-of-document id."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_reference(self, data: bytes) -> list[int]:
        """The definition, literally (see WorldVocab.encode_reference). Slow."""
        return self._t.vocab.encode_reference(data)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated bytes of `ids`; the end-of-document id 0 decodes to nothing."""
        vocab = self._t.id_to_bytes
        try:
            return b"".join([vocab[i] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < len(vocab))]
            raise ValueError(f"token ids {bad[:5]} are outside the World vocab (0..{len(vocab) - 1})"
                             ) from None

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Text of `ids` (UTF-8; a token sequence cut inside a character gives U+FFFD by default)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` package, without special tokens."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise UserError("reading tokenizer.json needs the `tokenizers` package; "
                            "pip install tokenizers") from None
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path} not found; check the --tokenizer path")
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # the Rust side raises its own exception type
            raise UserError(f"{path} is not a valid Hugging Face tokenizer.json ({e}); "
                            "pass a tokenizer.json file or omit --tokenizer for RWKV World") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str | None = None, native: bool = False,
                   warn: Callable[[str], None] | None = None) -> Tokenizer:
    """`None`/"world": RWKV World; a `.json` file: Hugging Face; a `.txt` file: a World-format vocab.

    native=True (make_data): the World vocab is encoded by our C trie (world_trie.py), else by
    pyrwkv-tokenizer (world_native.py), whichever first builds and gives the reference's ids on
    the start-up checks; `warn` gets one line saying why the C trie was not used, and the Python
    WorldTokenizer is the last resort. A World-format vocab .txt gets the C trie too (after the
    same checks on that vocab), else the Python tokenizer.
    """
    if spec is None or spec.lower() in ("world", "rwkv"):
        if native:
            from .world_native import NativeWorldTokenizer
            from .world_trie import TrieWorldTokenizer

            tok, why = TrieWorldTokenizer.create()
            if tok is not None:
                return tok
            fallback, why_not = NativeWorldTokenizer.create()
            if fallback is not None:
                (warn or _stderr)(f"note: {why}; using pyrwkv-tokenizer (same ids)")
                return fallback
            (warn or _stderr)(f"note: {why}, and {why_not}; using the built-in Python World "
                              "tokenizer (same ids, slower)")
        return WorldTokenizer()
    if not os.path.exists(spec):
        raise UserError(f"tokenizer file {spec} not found; pass a tokenizer.json, a World vocab "
                        ".txt, or omit --tokenizer for the RWKV World tokenizer")
    if os.path.isdir(spec):
        raise UserError(f"--tokenizer {spec} is a folder; pass the tokenizer.json or World vocab .txt file in it")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if native:
        from .world_trie import TrieWorldTokenizer

        tok, why = TrieWorldTokenizer.create(spec)
        if tok is not None:
            return tok
        (warn or _stderr)(f"note: {why}; using the built-in Python World tokenizer (same ids, slower)")
    return WorldTokenizer(spec)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)

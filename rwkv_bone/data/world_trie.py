"""The World vocab encoded by our own C byte trie (world_trie.c): make_data's default encoder.

The rule is tokenizer.py's greedy longest byte match; world_trie.c walks a flat trie whose first
two levels are dense tables, one sorted child list per further byte, and writes the ids straight
into a uint16 (or int32) array, so make_data gets numpy arrays, never Python lists of ints.

Start-up is a few milliseconds, not the ~0.3 s of reading the vocab text:
- the vocab file is parsed once (world_vocab.load_world_vocab, with its checks) and its tokens are
  cached as one binary file (ids' byte offsets, then the bytes) named by the vocab file's SHA-256,
  in ~/.cache/rwkv_bone (or $XDG_CACHE_HOME/rwkv_bone); later runs read that and build the trie in C;
- the C source is compiled on first use (rwkv_bone/native.py) and the build is cached;
- before a build is first used on a vocab, it must give the reference's ids on the vocab table and
  the probe text (world_native.check_encoder, the checks pyrwkv-tokenizer passes too); a pass is
  remembered under a key of the vocab's bytes, the library's file (named by a hash of its source,
  flags and compiler) and the checking code, so a changed anything runs the checks again.
No compiler, a failed build or a failed check: `create` returns None and the reason, and the
caller moves on to the next encoder (load_tokenizer).

ctypes releases the GIL during a call, so threads can encode side by side; a trie is read-only
after its build and is shared by forked workers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import native
from . import world_native, world_vocab as vocab_module
from .world_vocab import load_world_vocab, world_vocab, world_vocab_path

SOURCE = Path(__file__).with_name("world_trie.c")
CFLAGS = ("-O2", "-shared", "-fPIC", "-std=c11")
_MAGIC = b"RBWVOCB1"
_LOCK = threading.Lock()
_TRIES: dict[str, "TrieWorldTokenizer"] = {}   # built once per (vocab bytes, library) and process


@functools.lru_cache(maxsize=None)
def library_path() -> Path:
    """The compiled world_trie.c (built on the first call of a process, cached on disk)."""
    return native.build(SOURCE, CFLAGS)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.rb_trie_build.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.rb_trie_build.restype = ctypes.c_void_p
    lib.rb_trie_free.argtypes = [ctypes.c_void_p]
    lib.rb_trie_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.rb_trie_encode.restype = ctypes.c_int64
    lib.rb_trie_encode_many.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.rb_trie_encode_many.restype = ctypes.c_int64
    lib.rb_trie_encode_plain_jsonl.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.rb_trie_encode_plain_jsonl.restype = ctypes.c_int64
    lib.rb_trie_nodes.argtypes = [ctypes.c_void_p]
    lib.rb_trie_nodes.restype = ctypes.c_int64
    return lib


def vocab_tables(path: str, digest: str) -> tuple[bytes, np.ndarray]:
    """(blob, off): token id i has the bytes blob[off[i]:off[i + 1]] (id 0 and gaps: empty), from
    the binary cache of the vocab with SHA-256 `digest`, else parsed from `path` and cached."""
    cached = native.cache_dir() / f"world-vocab-{digest[:24]}.bin"
    try:
        data = cached.read_bytes()
        n = int(np.frombuffer(data, np.int64, 1, len(_MAGIC))[0])
        head = len(_MAGIC) + 8 * (n + 2)
        off = np.frombuffer(data, np.int64, n + 1, len(_MAGIC) + 8)
        if data[:len(_MAGIC)] == _MAGIC and n > 0 and off[0] == 0 and off[-1] == len(data) - head \
                and bool(np.all(off[1:] >= off[:-1])):
            return data[head:], off
    except (OSError, ValueError, IndexError):
        pass
    tokens = load_world_vocab(path)
    off = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=off[1:])
    blob = b"".join(tokens)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(_MAGIC + np.int64(len(tokens)).tobytes() + off.tobytes() + blob)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only means the text is parsed every time
    return blob, off


class TrieWorldTokenizer:
    """World vocab: encode with our C trie (ids straight into arrays), decode with the same table."""

    def __init__(self, path: str, blob: bytes, off: np.ndarray, trie: int):
        self.vocab_path = path
        self.vocab_size = len(off) - 1                # max id + 1: 65530 for the World vocab
        self.dtype = np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)
        self._blob, self._off, self._trie = blob, off, trie
        self._lib = _library()

    @classmethod
    def create(cls, vocab_path: str | None = None) -> tuple[TrieWorldTokenizer | None, str]:
        """(tokenizer, "") when the C trie builds and gives the reference's ids, else (None, why)."""
        path = os.path.abspath(vocab_path or world_vocab_path())
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            return None, f"cannot read the vocab {path} ({e.strerror})"
        with _LOCK:
            try:
                lib = _library()
            except (OSError, RuntimeError) as e:
                return None, f"the C tokenizer did not build ({e})"
            key = "|".join([digest, "world_trie", str(library_path()), _code_digest()])
            tok = _TRIES.get(key)
            if tok is not None:
                return tok, ""
            blob, off = vocab_tables(path, digest)
            trie = lib.rb_trie_build(blob, off.ctypes.data, len(off) - 1)
            if not trie:
                return None, "the C tokenizer could not build its trie (out of memory?)"
            tok = cls(path, blob, off, trie)
            if world_native.passed_before(key) is None:
                why = world_native.check_encoder(tok.encode, world_vocab(path), "the C tokenizer")
                if why:
                    lib.rb_trie_free(trie)
                    return None, why
                world_native.remember_pass(key, tok.vocab_size)
            _TRIES[key] = tok   # kept for the process: a later prepare() reuses it
            return tok, ""

    def __getstate__(self) -> dict:  # spawned workers rebuild it (the parent ran the checks)
        return {"vocab_path": self.vocab_path}

    def __setstate__(self, state: dict) -> None:
        tok, why = TrieWorldTokenizer.create(state["vocab_path"])
        if tok is None:
            raise RuntimeError(why)
        self.__dict__.update(tok.__dict__)

    def encode_array(self, data: bytes) -> np.ndarray:
        """Token ids of raw bytes as an array (uint16 for the World vocab)."""
        out = np.empty(len(data), self.dtype)
        n = self._lib.rb_trie_encode(self._trie, data, len(data), out.ctypes.data, int(self.dtype.itemsize == 4))
        return out[:n]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (greedy longest match over its UTF-8 bytes). No end-of-document id."""
        return self.encode_array(text.encode("utf-8")).tolist()

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts): every text's ids one after another in one array, and each text's number
        of ids (int64); one C call for all of them."""
        parts = [t.encode("utf-8") for t in texts]
        off = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=off[1:])
        data = b"".join(parts)
        out = np.empty(len(data), self.dtype)
        counts = np.empty(len(parts), np.int64)
        n = self._lib.rb_trie_encode_many(self._trie, data, off.ctypes.data, len(parts), out.ctypes.data,
                                          int(self.dtype.itemsize == 4), counts.ctypes.data)
        return out[:n], counts

    def encode_plain_jsonl(self, block: bytes, text_field: str, max_size: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, lines, sizes) of a block of .jsonl lines (valid UTF-8), parsed and encoded in C
        (world_trie.c): for each non-blank line, its index in the block and, when it is a plain
        record {"<text_field>": "...", ...} whose document fits max_size ids, its document's size
        (ids + the final 0) with those ids in `ids`; -1 for any other line (Python reads those)."""
        n = len(block)
        out = np.empty(n + 1, self.dtype)
        room = block.count(b"\n") + 1
        lines, sizes, n_ids = np.empty(room, np.int64), np.empty(room, np.int64), ctypes.c_int64(0)
        key = text_field.encode("utf-8")
        d = self._lib.rb_trie_encode_plain_jsonl(
            self._trie, block, n, key, len(key), max_size, out.ctypes.data, int(self.dtype.itemsize == 4),
            lines.ctypes.data, sizes.ctypes.data, ctypes.byref(n_ids))
        if d < 0:
            raise MemoryError("out of memory parsing a block of records")
        return out[:n_ids.value], lines[:d], sizes[:d]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        ids, counts = self.encode_flat(texts)
        return [a.tolist() for a in np.split(ids, np.cumsum(counts)[:-1])] if texts else []

    def token_bytes(self, i: int) -> bytes:
        return self._blob[self._off[i]:self._off[i + 1]]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids outside the World vocab (0..{self.vocab_size - 1})")
        blob, off = self._blob, self._off
        return b"".join([blob[off[i]:off[i + 1]] for i in arr.tolist()])

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


def _code_digest() -> str:
    """Hash of the code a verdict depends on besides the library: this file, the checks, the vocab
    reader (a changed check or reader must not be served an old pass)."""
    h = hashlib.sha256()
    for name in (__file__, world_native.__file__, vocab_module.__file__):
        with open(name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]

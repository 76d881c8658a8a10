"""The World vocab encoded by pyrwkv-tokenizer (Rust), checked against our reference at start.

pyrwkv-tokenizer implements the same greedy longest byte match as `WorldVocab.encode_reference`
(see tokenizer.py) in Rust, several times faster than our Python encoder. It is a separate
implementation, so `NativeWorldTokenizer.create` accepts it only after two checks, both against
our own reading of the same vocab file:

1. the table: every vocab token whose bytes are valid UTF-8 (65043 of 65529 in the World vocab)
   encodes, on its own, to its id (later ids win for duplicates, as in the official tokenizer);
   a lone token is its own longest match, so this compares the whole str-reachable table (~0.1 s);
2. the algorithm: `probe_text()`, a text covering every byte class (ASCII with every control and
   printable character, whitespace runs, Latin/Greek/Cyrillic/Arabic/Indic, CJK, kana, Hangul,
   emoji with modifiers and ZWJ, rare code points at every UTF-8 length boundary, noncharacters,
   code), encodes to the ids of the literal reference. The tokens that are not valid UTF-8 on
   their own (fragments of multi-byte characters) are reached only here, inside whole characters.

Any difference (or pyrwkv-tokenizer missing or failing) returns None with the reason, and the
caller falls back to the Python WorldTokenizer. make_data decodes its input as UTF-8 before
encoding, so the encoder only ever sees valid UTF-8: invalid bytes are rejected earlier, with the
line number, and an unpaired surrogate raises UnicodeEncodeError here as in the Python encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Sequence

from .world_vocab import WorldVocab, world_vocab, world_vocab_path

# The process that started pyrwkv-tokenizer's thread pool (see NativeWorldTokenizer.encode_many).
_BATCH_PID: int | None = None


def probe_text() -> str:
    """A fixed (seeded) text of ~20 kB touching every byte class the World vocab distinguishes."""
    rng = random.Random(13)
    parts = [
        "".join(map(chr, range(0, 128))),  # every ASCII byte, controls and DEL included
        "The Eiffel tower is in the city of Paris. It's 330 m tall; isn't it? (Yes!) [1] {a: b}",
        " " * 1 + "x" + " " * 2 + "x" + " " * 7 + "x" + " " * 33 + "x" + " " * 129 + "end",
        "\t" * 9 + "\n" * 5 + "\r\n" * 4 + " \t \n \r " + "\n\n\n  \n\t\n" + "\u00a0\u2003\u3000",
        "=" * 300 + "-" * 77 + "#" * 64 + "*" * 31 + "~~~" + "." * 500 + "_" * 99,
        "Straße café naïve façade Ærø Ångström œuvre İstanbul — “quotes” ‘single’ … «» ¿¡ ©®™ °±µ",
        "привет мир, Ελληνικά κείμενα, עברית, العربية, हिन्दी भाषा, ภาษาไทย, ქართული, Հայերեն",
        "中文测试：北京是中国的首都。我们在学习机器学习和自然语言处理。的一是不了人我在有他这",
        "日本語のテキスト、ひらがな、カタカナ、漢字。한국어 문장입니다. 안녕하세요!",
        "😀🎉👍🏽❤️🚀 👨‍👩‍👧‍👦 🇫🇷🇯🇵 🏳️‍🌈 ✋🏿 1️⃣ ☕ ♻️ 🧑‍💻",
        "\u200b\u200c\u200d\ufeff\u00ad\u0301e\u0301\u0338\u20dd\ufffd\ufffe\uffff\ue000\uf8ff",
        "\u0080\u07ff\u0800\uffff\U00010000\U0010ffff\U0001f600\U000e0001\U0001d11e\U00020000",
        "def f(x, y=3):\n    return {'a': [x ** 2, y]}  # comment\n\tif x != y: pass\r\n",
        "int main(void) { printf(\"%d\\n\", a[i] << 2 | 0xFF); return 0; }\n",
        '<div class="x">&amp; &lt;</div> {"key": [1, 2.5e-3, null, true]} SELECT * FROM t;',
        "1234567890 3.14159 1e-9 0xFF 2024-06-01T12:00:00Z 192.168.0.1 $100,000.00 50% #3",
    ]
    # Every code point of each UTF-8 length class in a sample, and seeded random mixtures.
    parts.append("".join(map(chr, range(0x80, 0x800, 3))))
    parts.append("".join(chr(c) for c in range(0x800, 0xD800, 97)))
    parts.append("".join(chr(c) for c in range(0xE000, 0x10000, 89)))
    parts.append("".join(chr(c) for c in range(0x10000, 0x110000, 4099)))
    pools = ["abcdefghij ", "   \n\t", ".,;:!?'\"()[]{}", "的一是不了人我在有他这", "😀🎉🚀",
             "αβγδ", "0123456789", "àéîõü", "\x00\x01\x1b\x7f"]
    for _ in range(40):
        parts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 200))))
    return "\n".join(parts)


def check_encoder(encode, vocab: WorldVocab, name: str) -> str:
    """'' when `encode` (str -> ids) gives the reference's ids on the table and on the probe text
    (checks 1 and 2 of the module docstring), else one sentence saying where `name` differs."""
    for tid, tok in enumerate(vocab.id_to_bytes):
        try:
            text = tok.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a fragment of a character: reached through the probe instead
        if text and encode(text) != [vocab.bytes_to_id[tok]]:
            return f"{name} encodes vocab token {tid} ({text!r}) differently"
    data = probe_text().encode("utf-8")
    want, got = vocab.encode_reference(data), encode(data.decode("utf-8"))
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        return f"{name}'s ids differ from the reference on the probe text at token {at}"
    return ""


class NativeWorldTokenizer:
    """World vocab: encode with pyrwkv-tokenizer, decode with our table. Build with `create`."""

    def __init__(self, vocab: WorldVocab | None, native, vocab_path: str | None = None,
                 vocab_size: int | None = None) -> None:
        self.vocab_path = vocab.path if vocab is not None else vocab_path
        self.vocab_size = len(vocab.id_to_bytes) if vocab is not None else vocab_size
        self._table = vocab       # our WorldVocab, read when first needed (decode, the checks)
        self._native = native     # pyrwkv_tokenizer.RWKVTokenizer on the same vocab file

    @property
    def _vocab(self) -> WorldVocab:
        if self._table is None:
            self._table = world_vocab(self.vocab_path)
        return self._table

    @classmethod
    def create(cls, vocab_path: str | None = None) -> tuple[NativeWorldTokenizer | None, str]:
        """(tokenizer, "") when pyrwkv-tokenizer gives our ids on the checks, else (None, reason).

        A pass is remembered (verdict_cache_file) under a key made of everything the checks
        depend on: the vocab file's bytes, the checking code (this file and world_vocab.py) and
        the pyrwkv-tokenizer build (version, class, compiled module's path, size and time), so a
        later run with all of them unchanged skips reading our vocab and the checks (~0.25 s of
        make_data's start-up); anything changed gives another key, and the checks run."""
        try:
            import pyrwkv_tokenizer
        except ImportError:
            return None, "pyrwkv-tokenizer is not installed"
        path = os.path.abspath(vocab_path or world_vocab_path())
        key = _verdict_key(path, pyrwkv_tokenizer)
        try:
            native = _BUILT.get(key) if key is not None else None
            if native is None:
                native = pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=path)
                _keep_for_the_process(key, native)
            size = passed_before(key)
            if size is not None:
                return cls(None, native, path, size), ""
            tok = cls(world_vocab(path), native)
            why = tok._check()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # pyo3 panics derive from BaseException
            return None, f"pyrwkv-tokenizer failed on the start-up check ({type(e).__name__}: {e})"
        if why:
            return None, why
        remember_pass(key, tok.vocab_size)
        return tok, ""

    def _check(self) -> str:
        """'' when the native ids equal the reference on the table and the probe, else why not."""
        return check_encoder(self._native.encode, self._vocab, "pyrwkv-tokenizer")

    def __getstate__(self) -> dict:  # spawned workers rebuild it (the parent ran the checks)
        return {"vocab_path": self.vocab_path, "vocab_size": self.vocab_size}

    def __setstate__(self, state: dict) -> None:
        import pyrwkv_tokenizer

        path = state["vocab_path"]
        self.__init__(None, pyrwkv_tokenizer.RWKVTokenizer(vocab_filepath=path), path, state["vocab_size"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (greedy longest match over its UTF-8 bytes). No end-of-document id."""
        return self._native.encode(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """[encode(t) for t in texts] in one call: pyrwkv-tokenizer's encode_batch, which spreads
        the texts over its Rust thread pool (RAYON_NUM_THREADS; all cores by default).

        That pool is started by the first encode_batch of a process and does not survive fork: a
        child forked after its parent used encode_batch would wait on the parent's threads
        forever. So a process uses the batch call only when it was the first to start the pool
        (or no ancestor it was forked from did); a child of a process that did encodes text by
        text, with the same ids."""
        global _BATCH_PID
        pid = os.getpid()
        if _BATCH_PID is not None and _BATCH_PID != pid:
            return [self._native.encode(t) for t in texts]
        _BATCH_PID = pid
        return self._native.encode_batch(texts)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return b"".join([self._vocab.id_to_bytes[i] for i in ids])
        except (IndexError, TypeError):
            raise ValueError(f"token ids outside the World vocab (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


# pyrwkv-tokenizer objects built in this process, by verdict key (vocab bytes + build): built once,
# never freed. Building one reads the vocab into a byte trie (~0.2 s, ~250 MB) and dropping it walks
# that trie again (~0.1 s): together a third of a 30 MB make_data run. Kept, a later prepare() in
# the process reuses it, and at exit the OS takes the pages back without the walk.
_BUILT: dict[str, object] = {}


def _keep_for_the_process(key: str | None, native: object) -> None:
    """Remember `native` under `key` and hold one extra reference that is never released, so
    neither the interpreter's shutdown nor a cleared cache drops it (at most one per vocab and
    build: a bounded, deliberate leak)."""
    if key is None or key in _BUILT:
        return
    import ctypes

    _BUILT[key] = native
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(native))


def verdict_cache_file() -> str:
    """Where passed start-up checks are remembered: $XDG_CACHE_HOME (or ~/.cache)/rwkv_bone/."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rwkv_bone", "pyrwkv-check.json")


def _verdict_key(vocab_path: str, package) -> str | None:
    """What a verdict depends on (see NativeWorldTokenizer.create); None when it cannot be told."""
    from . import world_vocab as vocab_module

    try:
        h = hashlib.sha256()
        for name in (vocab_path, __file__, vocab_module.__file__):
            with open(name, "rb") as f:
                h.update(f.read())
        compiled = getattr(getattr(package, "pyrwkv_tokenizer", None), "__file__", None)
        st = os.stat(compiled) if compiled else None
    except (OSError, TypeError):
        return None
    if st is None:
        return None
    cls = package.RWKVTokenizer
    return "|".join([h.hexdigest(), str(getattr(package, "__version__", "")), cls.__module__, cls.__qualname__,
                     compiled, str(st.st_size), str(st.st_mtime_ns)])


def _read_verdicts() -> dict:
    try:
        with open(verdict_cache_file(), encoding="utf-8") as f:
            verdicts = json.load(f)
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def passed_before(key: str | None) -> int | None:
    """The vocab size remembered with a pass under `key`, or None."""
    size = _read_verdicts().get(key) if key is not None else None
    return size if isinstance(size, int) and size > 0 else None


def remember_pass(key: str | None, vocab_size: int) -> None:
    """Add a pass to the cache file (written whole, then renamed; best effort: a read-only home
    only means the checks run every time)."""
    if key is None:
        return
    path = verdict_cache_file()
    verdicts = {k: v for k, v in _read_verdicts().items() if k != key}
    verdicts = dict(list(verdicts.items())[-31:])   # a few builds and vocabs, not a growing file
    verdicts[key] = vocab_size
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(verdicts, f)
        os.replace(tmp, path)
    except OSError:
        pass

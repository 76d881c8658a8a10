"""Our C byte trie for World vocabs (data/world_trie.py): the official tokenizer's ids and our
reference's on every kind of text and on raw bytes, custom vocabs (repeated byte strings, wide
nodes, ids over 65535), the start-up check and its remembered pass, the binary vocab cache, and
the fallbacks when it cannot build or disagrees."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest

from rwkv_bone import native
from rwkv_bone.data import world_native, world_trie
from rwkv_bone.data.tokenizer import WorldTokenizer, load_tokenizer, world_vocab_path
from rwkv_bone.data.world_native import NativeWorldTokenizer, probe_text
from rwkv_bone.data.world_trie import TrieWorldTokenizer
from rwkv_bone.data.world_vocab import WorldVocab, world_vocab

from test_tokenizer_native import mixed_corpus

# Only a machine without a C compiler skips: a trie that builds but fails its check fails the tests.
needs_trie = pytest.mark.skipif(native.compiler() is None, reason="the C tokenizer needs a C compiler")


@pytest.fixture(scope="module")
def trie() -> TrieWorldTokenizer:
    tok, why = TrieWorldTokenizer.create()
    assert tok is not None, why
    return tok


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder and no tries built in this process (restored afterwards)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(world_trie, "_TRIES", {})
    world_trie.library_path.cache_clear()
    world_trie._library.cache_clear()
    yield tmp_path
    world_trie.library_path.cache_clear()
    world_trie._library.cache_clear()


def write_vocab(path, extra: dict[int, bytes]) -> str:
    """A World-format vocab: the 256 single bytes at ids 1..256, plus `extra` (id -> bytes)."""
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    lines += [f"{i} {t!r} {len(t)}" for i, t in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@needs_trie
def test_ids_equal_the_official_tokenizer_and_the_reference_on_every_kind_of_text(trie):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    official, ours = TRIE_TOKENIZER(world_vocab_path()), WorldTokenizer()
    for doc in mixed_corpus() + [probe_text(), "", " ", "a", "\n\n"]:
        ids = trie.encode(doc)
        assert ids == official.encode(doc) == ours.encode_reference(doc.encode("utf-8")), doc[:40]
        assert trie.decode(ids) == doc and trie.encode_array(doc.encode("utf-8")).dtype == np.uint16


@needs_trie
def test_raw_bytes_even_invalid_utf8_encode_as_the_reference(trie):
    vocab, rng = world_vocab(), random.Random(1)
    tokens = [t for t in vocab.id_to_bytes if t]
    for _ in range(40):  # random bytes; and runs of whole tokens cut at random points
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        glued = b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 80)))
        for d in (data, glued, glued[rng.randrange(len(glued)):]):
            assert trie.encode_array(d).tolist() == vocab.encode_reference(d)


@needs_trie
def test_encode_flat_is_encode_of_each_text_one_after_another(trie):
    texts = mixed_corpus(20, seed=4) + ["", "x"]
    ids, counts = trie.encode_flat(texts)
    assert counts.tolist() == [len(trie.encode(t)) for t in texts]
    assert ids.tolist() == [i for t in texts for i in trie.encode(t)]
    assert trie.encode_many(texts) == [trie.encode(t) for t in texts]
    assert trie.encode_flat([])[0].size == 0 and trie.encode_many([]) == []
    with pytest.raises(UnicodeEncodeError):
        trie.encode_flat(["ok", "bad \ud800"])  # an unpaired surrogate, as the Python encoder


@needs_trie
def test_custom_vocabs_repeated_strings_wide_nodes_and_ids_over_65535(fresh):
    rng = random.Random(2)
    extra: dict[int, bytes] = {}
    # A wide node: "q" followed by each of 200 bytes (binary search), with longer tokens below it;
    # a repeated byte string (the later id wins); ids above 65535 (int32 output).
    for k, b in enumerate(rng.sample(range(256), 200)):
        extra[300 + k] = b"q" + bytes([b])
        extra[600 + k] = b"q" + bytes([b]) + b"zz"
    extra[900], extra[901] = b"hello", b"hello"
    extra[70000], extra[70001] = b"hello world", b"hell"
    path = write_vocab(fresh / "vocab.txt", extra)
    tok, why = TrieWorldTokenizer.create(path)
    assert tok is not None, why
    ref = WorldVocab(path)
    assert tok.vocab_size == 70002 and tok.encode_array(b"x").dtype == np.int32
    for _ in range(30):
        data = b"".join(rng.choice([b"q", b"zz", b"hello", b" world", b"hell", bytes([rng.randrange(256)])])
                        for _ in range(rng.randint(1, 60)))
        assert tok.encode_array(data).tolist() == ref.encode_reference(data)
    assert tok.encode("hello") == [901] and tok.encode("hello world!") == [70000, ord("!") + 1]
    assert tok.decode([70000, 901]) == "hello worldhello"
    with pytest.raises(ValueError, match="outside the World vocab"):
        tok.decode([70002])
    assert isinstance(load_tokenizer(path, native=True), TrieWorldTokenizer)  # make_data: the trie
    assert isinstance(load_tokenizer(path), WorldTokenizer)                   # elsewhere: Python


@needs_trie
def test_the_check_runs_once_per_vocab_and_build_and_the_vocab_cache_is_read_back(fresh, monkeypatch):
    checks = []
    real = world_native.check_encoder
    monkeypatch.setattr(world_native, "check_encoder", lambda *a: checks.append(1) or real(*a))
    first, why = TrieWorldTokenizer.create()
    assert first is not None and not why and len(checks) == 1
    cached = list((fresh / "cache" / "rwkv_bone").glob("world-vocab-*.bin"))
    assert len(cached) == 1 and os.path.isfile(world_native.verdict_cache_file())
    assert TrieWorldTokenizer.create()[0] is first                 # the same process: the same trie
    monkeypatch.setattr(world_trie, "_TRIES", {})                  # a new process, as it were
    monkeypatch.setattr(world_trie, "load_world_vocab", lambda p: pytest.fail("the text was parsed again"))
    second, _ = TrieWorldTokenizer.create()
    assert second is not first and len(checks) == 1                # pass remembered, cache read
    text = probe_text()
    assert second.encode(text) == first.encode(text) and second.decode(second.encode(text)) == text
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh / "cache"))
    monkeypatch.setattr(world_trie, "_TRIES", {})
    cached[0].write_bytes(cached[0].read_bytes()[:-5])             # a truncated cache file: ignored
    third, _ = TrieWorldTokenizer.create()
    assert third.encode(text) == first.encode(text) and len(cached[0].read_bytes()) > 1000


@needs_trie
def test_a_trie_that_disagrees_with_the_reference_is_refused_and_make_data_falls_back(fresh, monkeypatch):
    real = TrieWorldTokenizer.encode

    def wrong(self, text):
        ids = real(self, text)
        return ids[::-1] if "北京" in text and len(ids) > 1 else ids

    monkeypatch.setattr(TrieWorldTokenizer, "encode", wrong)
    tok, why = TrieWorldTokenizer.create()
    assert tok is None and why.startswith("the C tokenizer's ids differ from the reference on the probe text")
    lines: list[str] = []
    picked = load_tokenizer(None, native=True, warn=lines.append)
    assert len(lines) == 1 and "C tokenizer" in lines[0] and "\n" not in lines[0]
    assert isinstance(picked, (NativeWorldTokenizer, WorldTokenizer))


def test_no_compiler_falls_back_with_one_line_and_leaves_no_file(fresh, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    tok, why = TrieWorldTokenizer.create()
    assert tok is None and why == "the C tokenizer did not build (no C compiler found (set CC or install gcc))"
    lines: list[str] = []
    picked = load_tokenizer(None, native=True, warn=lines.append)
    assert isinstance(picked, (NativeWorldTokenizer, WorldTokenizer)) and len(lines) == 1
    assert lines[0].startswith("note: the C tokenizer did not build")
    assert not list((fresh / "cache").rglob("*.so"))


@needs_trie
def test_it_pickles_for_spawned_workers(trie):
    clone = pickle.loads(pickle.dumps(trie))
    assert clone.encode("héllo 世界") == trie.encode("héllo 世界") and clone.vocab_size == 65530


# ---- make_data's C reader of plain records (encode_plain_jsonl) ---------------------------------

_ATOMS = ["a", " ", "é", "中文", "😀", "\\n", '\\"', "\\\\", "\\/", "\\u00e9", "\\u4E2D", "\\ud83d\\ude00",
          "\\ud800", "\\udc00", "\\x", "\t", "\x01", "\x7f", "\\b\\f\\r\\t", "\\u12", "text", "\\u0000"]
_VALUES = ["1", "-0.5e+3", "01", "1.", "-", "1e", "2E-7", "true", "false", "null", "nul", "NaN", "Infinity",
           '[1, "a", {"b": [null]}]', "{}", "[]", "[1,]", '{"a":1,}', '{"a" 1}', '"s"', "[" * 40 + "]" * 40]
_ODD = ["", " ", "\r", "not json", "[1]", "{}", "\u3000", '{"text": "a"} x', ' {"text": "a"}', '{"text": "a"}\r\r',
        '{"query": "q", "response": "r"}', '{"te\\u0078t": "an escaped key"}', '{"text": "a"}  ', '{"text": 5}',
        '{"text": null}', '{"text": "a",}', '{"text" "a"}', '{"text": "unterminated}', '{"text": "a"', '{"text"}']


def _random_record(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rng.choice(_ODD)
    ws = lambda: rng.choice(["", "", " ", "\t", "\r", "  "])  # noqa: E731
    parts = []
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(['"text"', '"text"', '"meta"', '"id"', '"t"', '"texts"'])
        value = ('"' + "".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 6))) + '"'
                 if rng.random() < 0.6 else rng.choice(_VALUES))
        parts.append(ws() + key + ws() + ":" + ws() + value + ws())
    return "{" + ",".join(parts) + "}"


def _python_text(line: str) -> str | None:
    """The text make_data's Python path takes from a line without its general path: a JSON object
    read whole by json's scanner whose "text" is a string of valid Unicode; else None."""
    import json

    line = line.rstrip("\r")
    try:
        rec, end = json.scanner.make_scanner(json.JSONDecoder())(line, 0)
    except (StopIteration, ValueError):
        return None
    text = rec.get("text") if isinstance(rec, dict) and end == len(line) else None
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")  # a lone surrogate: not valid Unicode, the general path names it
    except UnicodeEncodeError:
        return None
    return text


@needs_trie
def test_the_c_reader_of_plain_records_reads_what_json_reads(trie):
    """Every line the C reader calls plain has json's text (ids + the final 0); json's plain lines
    that it leaves to Python are only the cases it declines by design; blank lines are skipped."""
    rng = random.Random(7)
    lines = [_random_record(rng) for _ in range(6000)]
    ids, line_of, sizes = trie.encode_plain_jsonl("\n".join(lines).encode("utf-8"), "text", 1 << 30)
    assert line_of.tolist() == [k for k, s in enumerate(lines) if s.strip(" \t\n\r\x0b\x0c")]
    starts = np.cumsum(np.maximum(sizes, 0)) - np.maximum(sizes, 0)
    declined = 0
    for d, k in enumerate(line_of.tolist()):
        want = _python_text(lines[k])
        if sizes[d] >= 0:
            assert want is not None, lines[k]
            assert ids[starts[d]:starts[d] + sizes[d]].tolist() == trie.encode(want) + [0], lines[k]
        elif want is not None:
            declined += 1  # an escaped key, padding, NaN/Infinity, a lone surrogate or deep nesting elsewhere
            assert any(x in lines[k] for x in ("\\u0078", "NaN", "Infinity", "\\ud800", "\\udc00", "[" * 33)) \
                or lines[k] != lines[k].strip(), lines[k]
    assert (sizes >= 0).sum() > 300 and declined < 0.5 * (sizes >= 0).sum()
    # A document over max_size ids is left to Python (which names it); other lines are unaffected.
    data = '{"text": "%s"}\n{"text": "ab"}' % ("中" * 50)
    _, _, sizes = trie.encode_plain_jsonl(data.encode(), "text", 10)
    assert sizes.tolist() == [-1, len(trie.encode("ab")) + 1]
    # The text field is the one named, matched on its exact bytes.
    ids, _, sizes = trie.encode_plain_jsonl('{"text": "x", "正文": "文"}'.encode(), "正文", 1 << 30)
    assert ids.tolist() == trie.encode("文") + [0] and sizes.tolist() == [len(ids)]


@needs_trie
@pytest.mark.parametrize("fmt", ["auto", "text"])
def test_a_block_through_the_c_reader_gives_what_python_gives(trie, fmt):
    """A worker's block of lines through the C reader (Python for the lines it declines, merged in
    line order) gives the ids, sizes, masks and errors of the Python path on the same records."""
    from rwkv_bone.data.prepare import PrepareOptions, _Block, _Encoder
    from rwkv_bone.data.tokenizer import token_dtype

    rng = random.Random(11)
    lines = [_random_record(rng) for _ in range(3000)] + ['{"query": "q", "response": "r"}', '{"text": "last"}']
    data = "\n".join(lines).encode("utf-8")
    enc = _Encoder(trie, PrepareOptions("x.jsonl", "out", format=fmt), "jsonl", token_dtype(trie.vocab_size))
    records = [(k + 1, s.rstrip("\r").encode()) for k, s in enumerate(lines) if s.strip(" \t\n\r\x0b\x0c")]
    a, b = enc.encode_batch(_Block(1, data)), enc.encode_batch((records, len(data)))
    assert a.tokens.tolist() == b.tokens.tolist() and a.sizes.tolist() == b.sizes.tolist()
    assert a.errors == b.errors and a.nbytes == b.nbytes and len(a.errors) > 100
    assert (a.masks is None) == (b.masks is None) == (fmt == "text")
    if fmt == "auto":
        assert a.masks.tolist() == b.masks.tolist() and 0 in a.masks.tolist()
    assert enc._plain_block(_Block(1, data)) is not None  # the C reader did take this block
    clean = "\n".join(f'{{"text": "doc {i} 中文"}}' for i in range(50)).encode()
    alone = enc.encode_batch(_Block(1, clean))  # no line for Python: the reader's ids as they are
    assert alone.tokens.tolist() == sum((trie.encode(f"doc {i} 中文") + [0] for i in range(50)), [])

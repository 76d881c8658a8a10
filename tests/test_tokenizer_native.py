"""pyrwkv-tokenizer for the World vocab: same ids as ours and the official one, checked at start,
fallback with one line when it differs or is missing, identical make_data output. make_data's
first choice is our C trie (test_tokenizer_trie.py); the fallback tests here take it away."""
from __future__ import annotations

import os
import pickle
import random
import sys

import pytest

from rwkv_bone.data.binidx import MMapIndexedDataset
from rwkv_bone.data.prepare import PrepareOptions, prepare
from rwkv_bone.data.tokenizer import WorldTokenizer, load_tokenizer, world_vocab, world_vocab_path
from rwkv_bone.data.world_native import NativeWorldTokenizer, probe_text

pytest.importorskip("pyrwkv_tokenizer")


def mixed_corpus(n: int = 60, seed: int = 0) -> list[str]:
    """Documents mixing prose, code, CJK, emoji, whitespace runs and rare code points."""
    rng = random.Random(seed)
    pools = ["the of and to in a is that for it ", "   \n\t\r\n", ".,;:!?'\"()[]{}<>=+-*/#",
             "的一是不了人我在有他这中国北京", "ひらがなカタカナ한국어", "😀🎉🚀👍🏽❤️👨‍👩‍👧",
             "αβγδ привет café", "0123456789", "\x00\x01\x1b\x7f\u200b\ufeff\ufffd\U0010ffff"]
    docs = ["def f(x):\n    return {'a': [x ** 2]}  # c\n", " " * 300 + "=" * 200, ""]
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 60)):
            pool = rng.choice(pools)
            words.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
        docs.append(rng.choice(["", " ", "\n"]).join(words))
    return docs


@pytest.fixture(scope="module")
def native() -> NativeWorldTokenizer:
    tok, why = NativeWorldTokenizer.create()
    assert tok is not None, why
    return tok


@pytest.fixture
def no_trie(monkeypatch):
    """As on a machine where our C trie does not build: pyrwkv-tokenizer is make_data's choice."""
    from rwkv_bone.data.world_trie import TrieWorldTokenizer

    monkeypatch.setattr(TrieWorldTokenizer, "create", classmethod(lambda cls, path=None: (None, "no C trie")))


@pytest.fixture(scope="module")
def python_tok() -> WorldTokenizer:
    return WorldTokenizer()


def test_native_ids_equal_ours_and_official_on_mixed_corpus(native, python_tok):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    official = TRIE_TOKENIZER(world_vocab_path())
    for doc in mixed_corpus() + [probe_text()]:
        ids = native.encode(doc)
        assert ids == python_tok.encode(doc) == official.encode(doc), doc[:40]
        assert native.decode(ids) == doc


def test_reference_with_length_bound_equals_unbounded_definition():
    vocab = world_vocab()
    data = "\n".join(mixed_corpus(8, seed=3)).encode("utf-8")

    ids, i = [], 0  # the definition with no bound at all: every length up to the longest token
    while i < len(data):
        for length in range(min(vocab.max_len, len(data) - i), 0, -1):
            if data[i:i + length] in vocab.bytes_to_id:
                ids.append(vocab.bytes_to_id[data[i:i + length]])
                i += length
                break
    assert vocab.encode_reference(data) == ids


def test_probe_covers_every_byte_class():
    text = probe_text()
    data = text.encode("utf-8")
    assert all(chr(c) in text for c in range(128))  # every ASCII byte, controls included
    lengths = {len(ch.encode("utf-8")) for ch in text}
    assert lengths == {1, 2, 3, 4}
    assert " " * 129 in text and "\t" * 9 in text and "\r\n" in text
    assert any(0x4E00 <= ord(c) <= 0x9FFF for c in text) and "\u200d" in text  # CJK, ZWJ emoji
    assert "\U0010ffff" in text and "\ufffe" in text and "def f(" in text
    assert len(set(data)) > 200  # nearly every byte value occurs (UTF-8 never has 0xC0, 0xC1, 0xF5+)


def test_load_tokenizer_native_for_world_only(tmp_path, native, no_trie):
    lines: list[str] = []
    assert isinstance(load_tokenizer(None, native=True, warn=lines.append), NativeWorldTokenizer)
    assert lines == ["note: no C trie; using pyrwkv-tokenizer (same ids)"]
    assert isinstance(load_tokenizer(None), WorldTokenizer)  # generate.py etc.: Python, decode_bytes
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 2"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    custom = load_tokenizer(str(path), native=True, warn=lambda line: None)  # pyrwkv: World vocab only
    assert isinstance(custom, WorldTokenizer) and custom.encode("abc") == [257, ord("c") + 1]


class _WrongOnCJK:
    """A stand-in for pyrwkv: right on every single token, wrong on sequences with CJK in them."""

    def __init__(self, vocab_filepath=None):
        self.vocab = world_vocab(vocab_filepath)

    def encode(self, text: str) -> list[int]:
        ids = self.vocab.encode_reference(text.encode("utf-8"))
        return ids[::-1] if len(ids) > 1 and "北京" in text else ids


def test_probe_difference_falls_back_with_one_line(monkeypatch, no_trie):
    import pyrwkv_tokenizer

    monkeypatch.setattr(pyrwkv_tokenizer, "RWKVTokenizer", _WrongOnCJK)
    tok, why = NativeWorldTokenizer.create()
    assert tok is None and "differ from the reference on the probe text" in why
    lines: list[str] = []
    assert isinstance(load_tokenizer(None, native=True, warn=lines.append), WorldTokenizer)
    assert len(lines) == 1 and "\n" not in lines[0] and "Python World tokenizer" in lines[0]


def test_table_difference_is_caught(monkeypatch):
    import pyrwkv_tokenizer

    class OffByOne(_WrongOnCJK):
        def encode(self, text: str) -> list[int]:
            ids = super().encode(text)
            return [i + 1 for i in ids] if text == " the" else ids

    monkeypatch.setattr(pyrwkv_tokenizer, "RWKVTokenizer", OffByOne)
    tok, why = NativeWorldTokenizer.create()
    assert tok is None and "encodes vocab token" in why and "' the'" in why


def test_missing_package_falls_back(monkeypatch, capsys, no_trie):
    monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)  # import raises ImportError
    assert isinstance(load_tokenizer(None, native=True), WorldTokenizer)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: no C trie, and pyrwkv-tokenizer is not installed; using the built-in Python World "
                   "tokenizer (same ids, slower)"]


def test_native_pickles_for_spawned_workers(native):
    clone = pickle.loads(pickle.dumps(native))
    assert clone.encode("héllo 世界") == native.encode("héllo 世界")


def test_make_data_trie_pyrwkv_and_python_write_identical_files(tmp_path, monkeypatch):
    from rwkv_bone.data.world_trie import TrieWorldTokenizer

    import json

    src = tmp_path / "c.jsonl"
    docs = mixed_corpus(40, seed=5)
    recs = [{"text": d} for d in docs] + [{"query": "问题 " + d[:20], "response": d[-30:]} for d in docs[:5]]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    out = {}
    real_create = TrieWorldTokenizer.create
    for name, native, workers in (("py", False, 1), ("c1", True, 1), ("c2", True, 2), ("rs1", True, 1),
                                  ("rs2", True, 2)):
        if name.startswith("rs"):
            monkeypatch.setattr(TrieWorldTokenizer, "create", classmethod(lambda cls, path=None: (None, "off")))
        elif native:
            assert isinstance(real_create()[0], TrieWorldTokenizer)
        prepare(PrepareOptions(str(src), str(tmp_path / name), native_tokenizer=native,
                               workers=workers, progress=False, batch_docs=7))
        out[name] = {ext: (tmp_path / (name + ext)).read_bytes()
                     for ext in (".bin", ".idx", ".mask.bin", ".mask.idx")}
    assert out["py"] == out["c1"] == out["c2"] == out["rs1"] == out["rs2"]
    ds = MMapIndexedDataset(str(tmp_path / "py"))
    assert len(ds) == len(recs) and ds.get(0).tolist() == WorldTokenizer().encode(docs[0]) + [0]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f or f.startswith(".")]


def test_a_second_create_in_the_process_reuses_the_built_native_tokenizer_with_the_same_ids():
    first, why = NativeWorldTokenizer.create()
    second, _ = NativeWorldTokenizer.create()
    assert not why and first is not None and second is not None
    assert second._native is first._native  # built once (~0.2 s), never dropped (~0.1 s)
    text = probe_text()
    assert second.encode(text) == first.encode(text) == WorldTokenizer().encode(text)

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

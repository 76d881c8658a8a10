"""World tokenizer: ids identical to the official rwkv TRIE_TOKENIZER; HF tokenizer.json wrapper."""
from __future__ import annotations

import pickle
import random

import pytest

from rwkv_bone.data.tokenizer import (HFTokenizer, WorldTokenizer, load_tokenizer, token_dtype,
                                      world_vocab_path)
from rwkv_bone.errors import UserError

FORMATS_EXAMPLE = "The Eiffel tower is in the city of"
FORMATS_IDS = [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]

MIXED = [
    FORMATS_EXAMPLE,
    "",
    "中文测试：北京是中国的首都。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "emoji 😀🎉👍🏽❤️🚀 and flags 🇫🇷🇯🇵, zero-width\u200bjoiner\u200d.",
    "def f(x, y=3):\n    return {'a': [x ** 2, y]}  # comment\n\tif x != y: pass\r\n",
    " " * 300 + "\n\n\n\n" + "\t" * 40 + "  \n  \n",
    "a" * 5000,
    "=" * 1000 + "-" * 257 + "#" * 81,
    "Straße café naïve привет мир àéîõü — “quotes” ‘single’ …",
    "x\x00y\x01\x7f control bytes and \ufffd replacement",
    "1234567890 3.14159 1e-9 0xFF 2024-06-01T12:00:00Z",
]


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(world_vocab_path())


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abcdefghij ", "   \n\t", ".,;:!?'\"()[]{}", "的一是不了人我在有他这",
             "😀🎉🚀", "αβγδ", "0123456789"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_formats_md_example_ids(tok):
    assert tok.encode(FORMATS_EXAMPLE) == FORMATS_IDS


def test_ids_match_official_on_mixed_text(tok, official):
    for text in MIXED:
        assert tok.encode(text) == official.encode(text), text[:40]
    joined = "\n\n".join(MIXED)
    assert tok.encode(joined) == official.encode(joined)


def test_ids_match_official_on_random_text(tok, official):
    rng = random.Random(0)
    for _ in range(30):
        text = _random_text(rng, rng.randint(1, 400))
        assert tok.encode(text) == official.encode(text), text


def test_fast_path_matches_literal_greedy_reference(tok):
    # Safe-split + cache + trie regex vs. "try every length, longest first".
    rng = random.Random(1)
    texts = MIXED + [_random_text(rng, 300) for _ in range(10)]
    for text in texts:
        data = text.encode("utf-8")
        assert tok.encode_bytes(data) == tok.encode_reference(data)


def test_cached_pieces_give_same_ids_on_second_encode(tok):
    text = "the cat sat on the mat, the cat sat. " * 20
    first = WorldTokenizer().encode(text)  # fresh cache
    assert tok.encode(text) == first and tok.encode(text) == first


def test_decode_round_trips(tok):
    for text in MIXED:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0] + tok.encode("hi") + [0]) == "hi"  # end-of-document decodes to nothing


def test_decode_of_cut_character_gives_replacement(tok):
    ids = tok.encode("中")
    bytes_ids = [b + 1 for b in "中".encode("utf-8")]  # single-byte tokens are byte + 1
    assert tok.decode(bytes_ids[:2]) == "\ufffd"
    assert tok.decode(bytes_ids) == tok.decode(ids) == "中"


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside the World vocab"):
        tok.decode([70000])


def test_tokenizer_pickles_by_vocab_path(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_path == tok.vocab_path and clone.encode("hello") == tok.encode("hello")


def test_world_vocab_size_fits_uint16(tok):
    assert tok.vocab_size == 65530
    assert token_dtype(tok.vocab_size).name == "uint16"
    assert token_dtype(65536).name == "uint16" and token_dtype(65537).name == "int32"


def test_custom_world_vocab_must_have_all_single_bytes(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n2 'ab' 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="lacks 255 of the 256 single-byte tokens"):
        WorldTokenizer(str(path))


def test_corrupt_world_vocab_line_is_named(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n2 'ab' 3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab.txt line 2: token literal does not match"):
        WorldTokenizer(str(path))


def test_small_world_format_vocab_encodes_greedily(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    lines += ["257 'ab' 2", "258 'abc' 3", "259 'bcd' 3"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    t = load_tokenizer(str(path))
    assert t.encode("abcd") == [258, ord("d") + 1]  # longest first: "abc" then "d"
    assert t.encode("abd") == [257, ord("d") + 1]
    assert t.encode_bytes(b"xabcdbcd") == t.encode_reference(b"xabcdbcd")


def test_hf_tokenizer_json_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eod>": 0, "[UNK]": 1, "hello": 2, "world": 3, "!": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    t = load_tokenizer(str(path))
    assert isinstance(t, HFTokenizer) and t.vocab_size == 5
    assert t.encode("hello world !") == [2, 3, 4]
    assert t.encode("hello there") == [2, 1]
    assert t.decode([2, 3]) == "hello world"
    assert pickle.loads(pickle.dumps(t)).encode("world") == [3]


def test_missing_or_invalid_tokenizer_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.json not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="bad.json is not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))

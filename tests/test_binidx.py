"""binidx writer/reader: layout checked by an independent struct/numpy reader; clear errors; magic_prime."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from rwkv_bone.data.binidx import (BinIdxWriter, MMapIndexedDataset, is_prime, load_masks,
                                   magic_prime, write_binidx)
from rwkv_bone.errors import UserError

DOCS = [[5, 6, 7, 0], [0], [65535, 1, 2, 3, 4, 0], [9, 0]]


def read_idx_independently(path: str) -> dict:
    """The .idx layout from formats.md, decoded with struct/numpy only."""
    with open(path, "rb") as f:
        data = f.read()
    magic = data[:9]
    version, = struct.unpack_from("<Q", data, 9)
    code, = struct.unpack_from("<B", data, 17)
    n, = struct.unpack_from("<Q", data, 18)
    d, = struct.unpack_from("<Q", data, 26)
    off = 34
    sizes = np.frombuffer(data, "<i4", n, off)
    off += 4 * n
    pointers = np.frombuffer(data, "<i8", n, off)
    off += 8 * n
    doc_idx = np.frombuffer(data, "<i8", d, off)
    off += 8 * d
    return dict(magic=magic, version=version, code=code, n=n, d=d, sizes=sizes.tolist(),
                pointers=pointers.tolist(), doc_idx=doc_idx.tolist(), rest=len(data) - off)


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.uint8, 1)])
def test_idx_header_and_pointers_match_the_spec(tmp_path, dtype, code):
    docs = [[t % 256 if dtype == np.uint8 else t for t in doc] for doc in DOCS]
    prefix = str(tmp_path / "d")
    assert write_binidx(prefix, docs, dtype) == (4, 13)
    idx = read_idx_independently(prefix + ".idx")
    item = np.dtype(dtype).itemsize
    assert idx["magic"] == b"MMIDIDX\x00\x00" and idx["version"] == 1 and idx["code"] == code
    assert idx["n"] == 4 and idx["d"] == 5 and idx["rest"] == 0
    assert idx["sizes"] == [4, 1, 6, 2]
    assert idx["pointers"] == [0, 4 * item, 5 * item, 11 * item]
    assert idx["doc_idx"] == [0, 1, 2, 3, 4]
    flat = np.fromfile(prefix + ".bin", dtype=np.dtype(dtype).newbyteorder("<"))
    assert flat.tolist() == [t for doc in docs for t in doc]


def test_reader_returns_documents_slices_and_metadata(tmp_path):
    prefix = str(tmp_path / "d")
    write_binidx(prefix, DOCS, np.uint16)
    for name in (prefix, prefix + ".bin", prefix + ".idx"):  # extension tolerated
        ds = MMapIndexedDataset(name)
        assert len(ds) == 4 and ds.dtype == np.uint16 and ds.num_tokens == 13
        assert [ds.get(i).tolist() for i in range(4)] == DOCS
    assert ds[2].tolist() == DOCS[2] and ds[-1].tolist() == DOCS[-1]
    assert ds.get(2, offset=1, length=3).tolist() == [1, 2, 3]
    assert ds.get(2, offset=4, length=10).tolist() == [4, 0]
    assert ds.tokens.tolist() == sum(DOCS, [])
    assert ds.sizes.tolist() == [4, 1, 6, 2] and ds.pointers.tolist() == [0, 8, 10, 22]
    with pytest.raises(IndexError):
        ds.get(4)


def test_streaming_writer_add_many_equals_add(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with BinIdxWriter(a, np.int32) as w:
        for doc in DOCS:
            w.add(doc)
    with BinIdxWriter(b, np.int32) as w:
        w.add_many(np.array(sum(DOCS[:3], [])), [4, 1, 6])
        w.add_many(np.array(DOCS[3]), [2])
    for ext in (".bin", ".idx"):
        assert open(a + ext, "rb").read() == open(b + ext, "rb").read()


def test_writer_error_leaves_no_files(tmp_path):
    def docs():
        yield [1, 2, 0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_binidx(str(tmp_path / "d"), docs(), np.uint16)
    assert os.listdir(tmp_path) == []


def test_nothing_visible_before_commit(tmp_path):
    w = BinIdxWriter(str(tmp_path / "d"), np.uint16)
    w.add([1, 0])
    w.finish()
    assert not any(n.startswith("d.") for n in os.listdir(tmp_path))
    w.commit()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_empty_dataset_reads_back(tmp_path):
    write_binidx(str(tmp_path / "e"), [], np.uint16)
    ds = MMapIndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.tokens.size == 0


def _write(tmp_path) -> str:
    prefix = str(tmp_path / "x")
    write_binidx(prefix, DOCS, np.uint16)
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_missing_files_are_named(tmp_path):
    prefix = _write(tmp_path)
    with pytest.raises(UserError, match=r"nope\.idx not found; --data_file takes the prefix"):
        MMapIndexedDataset(str(tmp_path / "nope"))
    os.remove(prefix + ".bin")
    with pytest.raises(UserError, match=r"x\.bin not found"):
        MMapIndexedDataset(prefix)


def test_bad_magic_is_reported(tmp_path):
    prefix = _write(tmp_path)
    _patch(prefix + ".idx", 0, b"NOTANIDX!")
    with pytest.raises(UserError, match=r"x\.idx is not a binidx index \(bad magic\)"):
        MMapIndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMID")  # shorter than a header
    with pytest.raises(UserError, match="bad magic"):
        MMapIndexedDataset(prefix)


def test_bad_version_and_dtype_code_are_reported(tmp_path):
    prefix = _write(tmp_path)
    _patch(prefix + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(UserError, match="binidx version 2, expected 1"):
        MMapIndexedDataset(prefix)
    _patch(prefix + ".idx", 9, struct.pack("<Q", 1))
    _patch(prefix + ".idx", 17, struct.pack("<B", 42))
    with pytest.raises(UserError, match="unknown dtype code 42"):
        MMapIndexedDataset(prefix)


def test_truncated_index_and_mismatched_bin_are_reported(tmp_path):
    prefix = _write(tmp_path)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(UserError, match=r"x\.bin is 28 bytes but .*13 tokens"):
        MMapIndexedDataset(prefix)
    data = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:-8])
    with pytest.raises(UserError, match="truncated or corrupt"):
        MMapIndexedDataset(prefix)


def test_pointers_disagreeing_with_sizes_are_reported(tmp_path):
    prefix = _write(tmp_path)
    _patch(prefix + ".idx", 34 + 4 * 4 + 8, struct.pack("<q", 6))  # pointers[1]
    with pytest.raises(UserError, match="sizes and pointers that disagree"):
        MMapIndexedDataset(prefix)


def test_masks_load_and_must_match_sizes(tmp_path):
    prefix = _write(tmp_path)
    tokens = MMapIndexedDataset(prefix)
    assert load_masks(prefix, tokens) is None
    write_binidx(prefix + ".mask", [[1] * len(d) for d in DOCS], np.uint8)
    masks = load_masks(prefix, tokens)
    assert masks.dtype == np.uint8 and masks.sizes.tolist() == tokens.sizes.tolist()
    write_binidx(prefix + ".mask", [[1] * len(d) for d in DOCS[:3]], np.uint8)
    with pytest.raises(UserError, match="does not match"):
        load_masks(prefix, tokens)


def test_magic_prime_matches_brute_force():
    def brute(tokens, ctx):
        limit = tokens // ctx - 1
        return max(p for p in range(2, limit + 1)
                   if p % 3 == 2 and all(p % q for q in range(2, int(p ** 0.5) + 1)))

    for tokens, ctx in [(10_000, 16), (123_457, 64), (99_999, 7), (3 * 512, 512), (40_000, 1)]:
        assert magic_prime(tokens, ctx) == brute(tokens, ctx)


def test_magic_prime_known_rwkv_values():
    # RWKV-LM's minipile recipe: 1498226207 tokens.
    assert magic_prime(1498226207, 512) == 2926181
    assert magic_prime(1498226207, 4096) == 365759
    assert is_prime(2926181) and 2926181 % 3 == 2


def test_magic_prime_sampling_visits_every_chunk_once():
    p = magic_prime(50_000, 100)
    starts = {(int(p * 0.618034) * i ** 3) % p for i in range(p)}
    assert starts == set(range(p))


def test_magic_prime_errors_on_too_little_data():
    with pytest.raises(UserError, match="fewer than 3 samples of ctx_len 512"):
        magic_prime(1000, 512)
    with pytest.raises(UserError, match="--ctx_len must be positive"):
        magic_prime(1000, 0)

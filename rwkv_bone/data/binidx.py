"""binidx (Megatron MMapIndexedDataset) files: a streaming writer and a memory-mapped reader.

PREFIX.idx, little-endian: magic `MMIDIDX\\x00\\x00` (9 bytes), `<Q` version 1, `<B` dtype code,
`<Q` N items, `<Q` D = len(doc_idx), int32 sizes[N], int64 pointers[N] (byte offset of each item in
.bin: pointers[i] = itemsize * sum(sizes[:i])), int64 doc_idx[D] (0..N, one item per document).
PREFIX.bin: all items' tokens concatenated in that dtype (end-of-document 0 included per item).

Also here: `magic_prime(tokens, ctx_len)`, the p for RWKV "get" sampling. Sample i starts at chunk
(floor(p * 0.618034) * i^3) mod p; for a prime p with p % 3 == 2, i -> i^3 is a bijection mod p, so
p consecutive samples visit each of the first p chunks exactly once (one pass over the data).
"""
from __future__ import annotations

import os
import struct
from array import array
from typing import Iterable

import numpy as np

from ..atomic import atomic_path
from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float32), 7: np.dtype(np.float64), 8: np.dtype(np.uint16),
}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
MAX_ITEM = 2**31 - 1  # sizes are int32


def split_prefix(path: str) -> str:
    """`data/x`, `data/x.bin` and `data/x.idx` all name the pair `data/x`."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class BinIdxWriter:
    """Streams items into PREFIX.bin/.idx through temp files; nothing appears until `commit`.

    Only the item sizes are kept in memory. `finish()` writes the index (still a temp file),
    `commit()` renames both into place, `abort()` deletes the temps. As a context manager it
    commits on success and aborts on an exception.
    """

    def __init__(self, prefix: str, dtype: np.dtype | type):
        self.prefix = split_prefix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"binidx cannot store dtype {self.dtype}")
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        self._bin_tmp, self._idx_tmp = atomic_path(self.bin_path), atomic_path(self.idx_path)
        self._sizes = array("i")
        self.num_tokens = 0
        self._finished = False
        try:
            self._bin = open(self._bin_tmp, "wb")
        except OSError as e:
            raise UserError(f"cannot write {self.bin_path} ({e.strerror}); "
                            "choose a writable --output location") from None

    @property
    def num_items(self) -> int:
        return len(self._sizes)

    def sizes(self) -> np.ndarray:
        """Sizes of the items written so far, int32 (N,)."""
        return np.array(self._sizes, dtype=np.int32)

    def add(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one item (a document, end-of-document id included by the caller)."""
        arr = np.asarray(tokens, dtype=self.dtype)  # (L,)
        self.add_many(arr, [arr.size])

    def add_many(self, flat: np.ndarray, sizes: Iterable[int]) -> None:
        """Append several items given as one flat array and their sizes (sum(sizes) == flat.size)."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != flat.size:
            raise ValueError(f"sizes add up to {int(sizes.sum())} but {flat.size} tokens were given")
        if sizes.size and int(sizes.max()) > MAX_ITEM:
            raise UserError(f"a document of {int(sizes.max())} tokens does not fit binidx (int32 "
                            "sizes); split the input into smaller documents")
        try:
            self._bin.write(flat.tobytes())
        except OSError as e:
            raise UserError(f"cannot write {self.bin_path} ({e.strerror}); "
                            "free disk space or choose another --output location") from None
        self._sizes.extend(sizes.astype(np.int32).tolist())
        self.num_tokens += flat.size

    def finish(self) -> None:
        """Close the .bin temp and write the .idx temp."""
        if self._finished:
            return
        self._bin.close()
        sizes = self.sizes()
        n = sizes.size
        pointers = np.zeros(n, dtype=np.int64)  # (N,) byte offsets
        if n > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        try:
            with open(self._idx_tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], n, n + 1))
                f.write(sizes.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(np.arange(n + 1, dtype="<i8").tobytes())
        except OSError as e:
            raise UserError(f"cannot write {self.idx_path} ({e.strerror}); "
                            "free disk space or choose another --output location") from None
        self._finished = True

    def commit(self) -> None:
        """Move the finished pair into place (the .bin first: a reader checks the .idx against it)."""
        self.finish()
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._bin.closed:
            self._bin.close()
        _remove(self._bin_tmp)
        _remove(self._idx_tmp)

    def __enter__(self) -> "BinIdxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_binidx(prefix: str, docs_iter: Iterable[Iterable[int]], dtype: np.dtype | type
                 ) -> tuple[int, int]:
    """Write one item per document; returns (items, tokens). Atomic: no partial files on error."""
    with BinIdxWriter(prefix, dtype) as w:
        for doc in docs_iter:
            w.add(doc)
    return w.num_items, w.num_tokens


class MMapIndexedDataset:
    """Read-only, memory-mapped binidx pair. The .bin is never loaded into RAM.

    `len(ds)` items; `ds.sizes` int32 (N,); `ds.pointers` int64 (N,); `ds.doc_idx` int64 (D,);
    `ds.dtype`; `ds.tokens` the whole .bin as one flat array; `ds.get(i, offset, length)` a view.
    """

    def __init__(self, prefix: str):
        self.prefix = split_prefix(os.fspath(prefix))
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path} not found; --data_file takes the prefix of a .bin/.idx "
                                "pair written by make_data.py (without the extension)")
        idx_len, bin_len = os.path.getsize(idx_path), os.path.getsize(bin_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:9] != MAGIC:
            raise UserError(f"{idx_path} is not a binidx index (bad magic); "
                            "recreate it with make_data.py")
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise UserError(f"{idx_path} has binidx version {version}, expected {VERSION}; "
                            "recreate it with make_data.py")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path} has unknown dtype code {code}; the index is corrupt, "
                            "recreate it with make_data.py")
        expected = HEADER.size + 4 * n + 8 * n + 8 * d
        if idx_len != expected:
            raise UserError(f"{idx_path} is {idx_len} bytes but its header promises {expected} "
                            f"({n} items); the index is truncated or corrupt, recreate it")
        self.dtype = DTYPE_CODES[code]
        off = HEADER.size
        self.sizes = np.memmap(idx_path, dtype="<i4", mode="r", offset=off, shape=(n,)) \
            if n else np.zeros(0, np.int32)
        off += 4 * n
        self.pointers = np.memmap(idx_path, dtype="<i8", mode="r", offset=off, shape=(n,)) \
            if n else np.zeros(0, np.int64)
        off += 8 * n
        self.doc_idx = np.memmap(idx_path, dtype="<i8", mode="r", offset=off, shape=(d,)) \
            if d else np.zeros(0, np.int64)
        total = int(self.sizes.sum(dtype=np.int64))
        item = self.dtype.itemsize
        if n and (int(self.sizes.min()) < 0 or not np.array_equal(
                self.pointers, np.concatenate(([0], np.cumsum(self.sizes[:-1], dtype=np.int64))) * item)):
            raise UserError(f"{idx_path} has sizes and pointers that disagree; the index is "
                            "corrupt, recreate it with make_data.py")
        if bin_len != total * item:
            raise UserError(f"{bin_path} is {bin_len} bytes but {idx_path} describes {total} "
                            f"tokens of {item} bytes ({total * item}); the pair does not match, "
                            "recreate both with make_data.py")
        self.num_tokens = total
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(total,)) \
            if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of item i from `offset`, at most `length` of them (a read-only view)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        base = int(self.pointers[i]) // self.dtype.itemsize
        start, stop = base + offset, base + int(self.sizes[i])
        if length is not None:
            stop = min(stop, start + length)
        return self.tokens[start:stop]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


def token_id_range(ds: MMapIndexedDataset, chunk: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) token id in ds's .bin ((0, -1) when empty), scanned once in chunks of the
    memory map and cached in PREFIX.maxid.json, keyed by the .bin's size and mtime, so a later run
    on the same data reads the answer instead of the file. A read-only folder just goes uncached."""
    import json

    from ..atomic import text_atomic

    bin_path, cache = ds.prefix + ".bin", ds.prefix + ".maxid.json"
    st = os.stat(bin_path)
    key = {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns, "dtype": ds.dtype.name}
    try:
        with open(cache) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in key} == key:
            return int(saved["min_id"]), int(saved["max_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, stale or unreadable: scan again
    lo, hi = 0, -1
    n = int(ds.tokens.shape[0])
    for i in range(0, n, chunk):
        part = ds.tokens[i:i + chunk]
        lo = int(part.min()) if i == 0 else min(lo, int(part.min()))
        hi = max(hi, int(part.max()))
    try:
        text_atomic(json.dumps({**key, "min_id": lo, "max_id": hi}), cache)
    except OSError:
        pass
    return lo, hi


def load_masks(prefix: str, tokens: MMapIndexedDataset) -> MMapIndexedDataset | None:
    """The PREFIX.mask pair written by make_data for instruction data, or None when there is none.

    mask[j] = 1 where token j is a response token (to be predicted), 0 for prompt tokens.
    """
    mprefix = split_prefix(os.fspath(prefix)) + ".mask"
    if not os.path.exists(mprefix + ".idx") and not os.path.exists(mprefix + ".bin"):
        return None
    masks = MMapIndexedDataset(mprefix)
    if len(masks) != len(tokens) or not np.array_equal(masks.sizes, tokens.sizes):
        raise UserError(f"{mprefix}.idx does not match {tokens.prefix}.idx (different document "
                        "sizes); recreate both with make_data.py")
    return masks


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (enough for any token count)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(tokens: int, ctx_len: int) -> int:
    """The largest prime p <= tokens // ctx_len - 1 with p % 3 == 2 (one pass of "get" sampling)."""
    if ctx_len <= 0:
        raise UserError(f"--ctx_len must be positive, got {ctx_len}")
    p = tokens // ctx_len - 1
    while p >= 2:
        if p % 3 == 2 and is_prime(p):
            return p
        p -= 1
    raise UserError(f"{tokens} tokens make fewer than 3 samples of ctx_len {ctx_len}; "
                    "use more data or a smaller --ctx_len")

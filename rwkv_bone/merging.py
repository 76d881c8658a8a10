"""Streamed merge: fold adapters into a base checkpoint at the cost of one layer in memory.

The base is memory-mapped (rwkv_bone.checkpoint), so every tensor the adapters leave alone is
written straight from the page cache. A merged weight has exactly the bits
peft.adapter_io.merge_state_dict gives it (each adapter's registry `merged(W, s, tensors)` in
float32, cast back to the base dtype after each adapter, so several adapters give the same bits),
one layer at a time; a Bone weight is computed a few rows at a time (bone_merged: the same float32
operations in the same order, without weight-sized float32 temporaries), its NaN/inf check done
on each chunk while it is in cache.

- .pth output: torch.save needs every tensor at once, so it is run under
  torch.serialization.skip_data with an untouched torch.empty placeholder for each merged weight:
  that writes the zip layout with room for every storage, which a second pass fills in order.
  (On a torch without skip_data, each merged weight goes into its own slice of a MAP_SHARED
  scratch file next to the output, file-backed pages, then one ordinary torch.save.)
- .safetensors output: the header is known from the shapes alone, so tensors are merged and
  written one after another.
In both, a writer thread writes tensor i while the next one is merged, and starts its writeback to
disk at once (sync_file_range), so the final fsync does not find the whole file still in memory.

Every output tensor is checked for NaN/inf as it passes; the output is written atomically (a
refused or failed merge leaves no file behind, an existing one is replaced only by a whole file).
"""
from __future__ import annotations

import json
import os
import queue
import struct
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import is_finite, is_safetensors, load_state_dict, non_finite_message
from .config import RWKV6Config
from .errors import UserError
from .peft.adapter_io import check_against_base, merged_weight, read_adapter_file
from .peft.formats.common import AdapterFile

# torch dtype -> safetensors dtype name (the inverse of checkpoint.SAFETENSORS_DTYPES).
_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class _Recipe:
    """How one output tensor is made: `start` with each (settings, layer tensors) folded in order."""
    start: Tensor
    ops: list[tuple[dict, dict[str, Tensor]]] = field(default_factory=list)
    from_base: bool = False

    def materialise(self) -> tuple[Tensor, bool]:
        """(the output tensor, whether it is already known to be finite)."""
        t, finite = self.start, False
        for meta, tensors in self.ops:
            if meta["method"] == "bone":
                t, finite = _bone_merged(t, meta, tensors, check_finite=True)
            else:
                t, finite = merged_weight(t, meta, tensors), False
                _release_freed_memory()
        return t, finite


# About 512 KB of float32 per chunk of rows: the chunk stays in cache through the steps below.
_CHUNK_ELEMENTS = 1 << 17


def bone_merged(weight: Tensor, meta: dict, tensors: dict[str, Tensor]) -> Tensor:
    """merged_weight(weight, meta, tensors) for a Bone adapter: the same bits, a few rows at a time.

    merged_weight computes, in float32 and then cast to weight's dtype,
        W' = W + (einsum(W, M) + T)      (peft/bone.py bone_delta, then bone.merged)
    with M = B (row, col) or A (ab), and T = B_c[i, k] in every block (a, c) (row: B, ab: the
    second tensor B) or B_a[i, k] (col). Here each chunk of rows is converted to float32 and
    multiplied by the same b x b blocks (the same K = b dot products: the same float32 values),
    then T and W are added in place in that order and the chunk is cast straight into the
    output: no weight-sized float32 temporaries and no permuted copies. W (out, in) = (a i, c j)."""
    return _bone_merged(weight, meta, tensors)[0]


def _bone_merged(weight: Tensor, meta: dict, tensors: dict[str, Tensor],
                 check_finite: bool = False) -> tuple[Tensor, bool]:
    """(bone_merged(...), every output element finite); the check (when asked) runs per chunk
    while the chunk is in cache, instead of a second pass over the whole weight."""
    mode = meta["bone_mode"]
    m = (tensors["bone_a"] if mode == "ab" else tensors["bone"]).float()
    t_add = (tensors["bone_b"] if mode == "ab" else tensors["bone"]).float()
    n_out, n_in = weight.shape
    b = m.shape[-1]
    C = n_in // b
    out = torch.empty(weight.shape, dtype=weight.dtype)
    finite = True
    if mode == "col":
        for a in range(n_out // b):                          # one output block: b rows
            wf = weight[a * b:(a + 1) * b].float().reshape(b * C, b)   # rows (i, c), columns j
            e = torch.mm(wf, m[a]).view(b, C, b)             # W[a,c] B_a for every c
            e.add_(t_add[a].unsqueeze(1)).add_(wf.view(b, C, b))
            chunk = out[a * b:(a + 1) * b]
            chunk.view(b, C, b).copy_(e)
            finite = finite and (not check_finite or is_finite(chunk))
        return out, finite and check_finite
    rows = b * max(1, _CHUNK_ELEMENTS // (n_in * b))
    for r0 in range(0, n_out, rows):
        wf = weight[r0:r0 + rows].float()                    # (R, in)
        R = wf.shape[0]
        wv = wf.view(R, C, b).transpose(0, 1)                # (C, R, b): W[., c] per input block
        e = torch.bmm(wv, m)                                 # (C, R, b) = W[a,c] M_c
        e.view(C, R // b, b, b).add_(t_add.unsqueeze(1)).view(C, R, b).add_(wv)
        chunk = out[r0:r0 + R]
        chunk.view(R, C, b).copy_(e.transpose(0, 1))
        finite = finite and (not check_finite or is_finite(chunk))
    return out, finite and check_finite


def plan_merge(base: dict[str, Tensor], files: Sequence[AdapterFile]) -> dict[str, _Recipe]:
    """{output key: recipe} for folding `files` in order into `base`, with every adapter checked
    against the model as it stands after the ones before it (what merge_state_dict checks)."""
    recipes = {k: _Recipe(v, from_base=True) for k, v in base.items()}
    state_shapes = RWKV6Config.from_state_dict(base).state_shapes()
    for af in files:
        shapes = {k: tuple(r.start.shape) for k, r in recipes.items()}
        check_against_base(af, shapes, "the base checkpoint", state_shapes if af.states else None)
        for name, tensors in af.layers.items():
            recipes[f"{name}.weight"].ops.append((af.meta, tensors))
        for key, t in af.states.items():
            recipes[key] = _Recipe(t.float().contiguous())
        for key, t in af.others.items():
            recipes[key] = _Recipe(t.to(recipes[key].start.dtype))
    return recipes


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere). Each merge
    frees float32 temporaries of a few tens of MB that glibc would otherwise keep, and their
    fragments add up to gigabytes over the layers of a large model."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _checked(key: str, t: Tensor, known_finite: bool, describe: Callable[[str, Tensor], str]) -> Tensor:
    if not known_finite and not is_finite(t):
        raise UserError(describe(key, t))
    return t


def _start_writeback_fn() -> Callable[[int, int, int], None] | None:
    """Linux sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) (None elsewhere): starts
    writing a range to disk without waiting. The output is fsync'ed at the end (atomic.write_atomic);
    without this, a checkpoint larger than the kernel's dirty-page threshold would sit in memory
    until that fsync and then be written while nothing else happens."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)   # 2 = SYNC_FILE_RANGE_WRITE


def _pipelined_write(f, jobs: Iterator[tuple[int | None, Tensor]]) -> None:
    """Write each (file offset or None for "here", tensor) that `jobs` yields; a writer thread
    writes tensor i (and starts its writeback to disk) while this thread produces (merges) tensor
    i + 1 (file writes and torch ops both release the GIL). At most two produced tensors wait."""
    todo: queue.Queue = queue.Queue(maxsize=2)
    failed: list[BaseException] = []
    writeback = _start_writeback_fn()

    def writer() -> None:
        while (job := todo.get()) is not None:
            try:
                if not failed:
                    if job[0] is not None:
                        f.seek(job[0])
                    start = f.tell()
                    data = job[1].contiguous().reshape(-1).view(torch.uint8).numpy().data
                    f.write(data)
                    if writeback is not None and data.nbytes >= 1 << 20:
                        f.flush()
                        writeback(f.fileno(), start, data.nbytes)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producing thread
                failed.append(e)
            del job

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for job in jobs:
            if failed:
                break
            todo.put(job)
    finally:
        todo.put(None)
        thread.join()
    if failed:
        raise failed[0]


def _zip_record_offsets(path: str) -> dict[str, tuple[int, int]]:
    """{record name: (offset of its bytes, size)} of the uncompressed zip torch.save writes."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        out = {}
        for info in z.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _write_pth(recipes: dict[str, _Recipe], output: str, describe: Callable[[str, Tensor], str]) -> None:
    """torch.save under skip_data writes the file's layout with room for every storage; a second
    pass fills that room in order, merging each adapted weight just before its bytes are due.
    A merged weight's placeholder is torch.empty (untouched pages: no memory)."""
    from .atomic import write_atomic

    if not hasattr(torch.serialization, "skip_data"):   # torch < 2.5
        _write_pth_scratch(recipes, output, describe)
        return
    out = {k: torch.empty(r.start.shape, dtype=r.start.dtype) if r.ops else r.start for k, r in recipes.items()}

    def jobs(offsets: dict[int, tuple[int, int]]) -> Iterator[tuple[int | None, Tensor]]:
        seen: dict[int, int] = {}   # storage -> its record number (torch.save numbers them in order)
        for key, r in recipes.items():
            storage = out[key].untyped_storage()
            first = storage._cdata not in seen
            index = seen.setdefault(storage._cdata, len(seen))
            offset, size = offsets[index]
            if size != storage.nbytes():
                raise RuntimeError(f"torch.save record {index} holds {size} bytes, not {key}'s {storage.nbytes()}")
            if r.ops:
                yield offset, _checked(key, *r.materialise(), describe)
            else:
                _checked(key, out[key], False, describe)
                if first:
                    yield offset, torch.empty(0, dtype=torch.uint8).set_(storage)

    def write(tmp: str) -> None:
        with torch.serialization.skip_data():
            torch.save(out, tmp)
        records = _zip_record_offsets(tmp)
        offsets = {int(name.rsplit("/", 1)[1]): v for name, v in records.items()
                   if name.rsplit("/", 2)[-2:-1] == ["data"]}
        with open(tmp, "r+b") as f:
            _pipelined_write(f, jobs(offsets))

    write_atomic(output, write)


def _write_pth_scratch(recipes: dict[str, _Recipe], output: str, describe: Callable[[str, Tensor], str]) -> None:
    """The fallback for a torch without skip_data: each merged weight is written into its own slice
    of a scratch file mapped MAP_SHARED (file-backed pages), then one torch.save."""
    from .atomic import torch_save_atomic

    merged = [k for k, r in recipes.items() if r.ops and r.start.numel()]
    sizes = {k: recipes[k].start.numel() * recipes[k].start.element_size() for k in merged}
    out: dict[str, Tensor] = {}
    fd, scratch = tempfile.mkstemp(prefix=".merge-scratch-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        total = sum(sizes.values())
        os.ftruncate(fd, total)
        if total and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, total)  # blocks allocated up front, not in each page fault
        os.close(fd)
        offset = 0
        for key, r in recipes.items():
            if key not in sizes:
                out[key] = _checked(key, *r.materialise(), describe)
                continue
            # This weight's own MAP_SHARED slice of the scratch file: file-backed pages.
            raw = np.memmap(scratch, dtype=np.uint8, mode="r+", offset=offset, shape=(sizes[key],))
            buf = torch.from_numpy(raw).view(r.start.dtype).view(r.start.shape)
            buf.copy_(_checked(key, *r.materialise(), describe))
            out[key] = buf
            offset += sizes[key]
        torch_save_atomic(out, output)
    finally:
        out.clear()
        if os.path.exists(scratch):
            os.remove(scratch)


def _write_safetensors(recipes: dict[str, _Recipe], output: str, describe: Callable[[str, Tensor], str]) -> None:
    from .atomic import write_atomic

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, r in recipes.items():
        if r.start.dtype not in _ST_NAMES:
            raise UserError(f"tensor {key} has dtype {r.start.dtype}, which safetensors cannot hold; "
                            "write a .pth instead")
        n = r.start.numel() * r.start.element_size()
        header[key] = {"dtype": _ST_NAMES[r.start.dtype], "shape": list(r.start.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned

    def jobs() -> Iterator[tuple[int | None, Tensor]]:
        for key, r in recipes.items():
            yield None, _checked(key, *r.materialise(), describe)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            _pipelined_write(f, jobs())

    write_atomic(output, write)


def merge_checkpoint(base_path: str | os.PathLike, adapters: Sequence[AdapterFile | str | os.PathLike],
                     output_path: str | os.PathLike, lora_alpha: float | None = None,
                     pissa_init: str | os.PathLike | None = None) -> list[AdapterFile]:
    """Fold `adapters` (files/folders of any supported format, or parsed AdapterFiles) in order into
    the checkpoint at `base_path` (.pth or .safetensors) and write `output_path` (.safetensors when
    it ends so, else .pth) with the same bits merge_state_dict would give; returns the parsed
    adapters. Anonymous memory stays at about one merged layer."""
    from .atomic import check_writable_dir

    base_path, output_path = os.fspath(base_path), os.fspath(output_path)
    if os.path.isdir(output_path):
        raise UserError(f"output {output_path} is a folder; give the path of the checkpoint file to write")
    check_writable_dir(output_path, "output")
    files = [a if isinstance(a, AdapterFile) else read_adapter_file(a, lora_alpha, pissa_init) for a in adapters]
    base = load_state_dict(base_path, check_finite=False)   # mapped; every tensor is checked below
    if os.path.exists(output_path) and os.path.exists(base_path) and os.path.samefile(output_path, base_path):
        raise UserError(f"output {output_path} is the base checkpoint; choose another output path")
    recipes = plan_merge(base, files)
    names = ", ".join(af.path for af in files)

    def describe(key: str, t: Tensor) -> str:
        # A base tensor that is already non-finite is the base's fault, adapted or not.
        if recipes[key].from_base and (not recipes[key].ops or not is_finite(base[key])):
            return non_finite_message(base_path, key)
        return (f"merging {names} into {base_path} gives NaN or infinite values in {key} (adapter values "
                f"too large for the base's {t.dtype}?); nothing was written")

    (_write_safetensors if is_safetensors(output_path) else _write_pth)(recipes, output_path, describe)
    return files


__all__ = ["bone_merged", "merge_checkpoint", "plan_merge"]

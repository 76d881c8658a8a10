"""Reading official RWKV-6 checkpoints: load, strip wrapper prefixes, recognise other RWKV
generations, and validate every key and shape against the layout the shapes themselves imply.

Both .pth (torch.save zip, memory-mapped) and .safetensors files are read without copying: every
tensor is a view of a file-backed mapping, so loading costs page cache, not anonymous memory, and
nothing is read from disk until a tensor's values are used. `read_shapes` / `read_config` validate
a checkpoint from its shapes alone (a dry run never touches the weights).

Each refusal is one sentence saying what was found and what was expected (a UserError).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Iterator, Mapping

import torch
from torch import Tensor

from .config import RWKV6Config
from .errors import UserError

# Lightning / DeepSpeed / DDP wrappers prepend these to every key.
WRAPPER_PREFIXES = ("_forward_module.", "module.", "model.")
# Keys only adapter files have: ours (with a "__peft__" settings entry) and RWKV-PEFT's (Bone,
# LoRA/PiSSA, DiSHA tensors beside a linear; state tuning's per-layer initial state).
ADAPTER_META_KEY = "__peft__"
ADAPTER_KEY_RE = re.compile(r"\.(bone\w*|lora_[AB]|init_lora_[AB]|disha\w*|miss\w*)$|^blocks\.\d+\.att\.time_state$")


def _torch_load(path: str) -> object:
    """torch.load without executing pickled code; memory-mapped when the file is in the zip format
    (legacy torch.save files cannot be memory-mapped and are read normally)."""
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise UserError(_not_torch(path)) from None
        raise UserError(
            f"{path} holds Python objects besides tensors; expected a plain state dict saved with "
            "torch.save(model.state_dict())"
        ) from None
    except MemoryError:
        raise
    except Exception:  # anything else: not a torch checkpoint, or a truncated/corrupt one
        raise UserError(_not_torch(path)) from None


# safetensors dtype names -> torch dtypes (the ones a model checkpoint can hold).
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Largest header a safetensors file may declare (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def safetensors_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, {key: {"dtype", "shape", "data_offsets"}}) of a .safetensors
    file, checked against the file size; raises UserError for anything malformed."""
    bad = UserError(f"{path} is not a readable safetensors checkpoint (truncated, corrupt or another "
                    "format); expected an RWKV-6 .safetensors or .pth")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise bad
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[entry["dtype"]]).element_size()
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} tensor {key} has an unreadable or unsupported entry "
                            f"{entry!r}; expected a safetensors checkpoint of float/int tensors") from None
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise bad
    return 8 + n, header


def _safetensors_load(path: str) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file as a view of one private file mapping (no copy)."""
    start, header = safetensors_header(path)
    size = os.path.getsize(path)
    if not header:
        return {}
    # MAP_PRIVATE mapping: pages stay file-backed until written (nothing here writes them).
    raw = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        chunk = raw[start + begin:start + end]
        if (start + begin) % chunk.new_empty((), dtype=dtype).element_size():
            chunk = chunk.clone()  # a misaligned tensor cannot be viewed in place
        out[key] = chunk.view(dtype).view(entry["shape"])
    return out


def _safetensors_shapes(path: str) -> dict[str, Tensor]:
    """The header of a .safetensors file as meta tensors (shapes and dtypes, no data)."""
    header = safetensors_header(path)[1]
    return {k: torch.empty(e["shape"], dtype=SAFETENSORS_DTYPES[e["dtype"]], device="meta")
            for k, e in header.items()}


def _not_torch(path: str) -> str:
    return (
        f"{path} is not a readable PyTorch checkpoint (a different format, or truncated/corrupt); "
        "expected an RWKV-6 .pth saved with torch.save"
    )


def strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove `_forward_module.` / `module.` / `model.` wrapper prefixes (possibly nested)."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def detect_generation(sd: Mapping[str, Tensor]) -> str | None:
    """Name the RWKV generation when the keys show it is NOT RWKV-6, else None."""
    keys = list(sd)
    has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
    if has(r"\.att\.(w0|a0|a1|x_r|x_w|r_k|k_k)$"):
        return "RWKV-7 (keys like att.w0, att.a0, att.x_r)"
    if has(r"\.att\.time_maa_w1$"):
        return None
    if has(r"\.att\.time_mix_k$") or has(r"\.att\.time_first$"):
        if has(r"\.att\.ln_x\."):
            return "RWKV-5 (keys ln_x with time_mix_k / time_first)"
        return "RWKV-4 (keys like att.time_first, att.time_mix_k)"
    if has(r"\.att\.time_faaaa$"):
        return "RWKV-5 (time_faaaa present but no time_maa_w1)"
    return None


def is_adapter_only(sd: Mapping[str, object]) -> bool:
    """True for a file of adapter tensors without the base model's weights (ours or a peer's)."""
    if ADAPTER_META_KEY in sd:
        return True
    has_base = any(k.endswith(".att.key.weight") for k in sd)
    return not has_base and any(ADAPTER_KEY_RE.search(k) for k in sd)


def adapter_not_model(source: str) -> str:
    """The one sentence every place that expects a model says when it is given an adapter."""
    return (f"{source} is an adapter (it holds only adapter tensors), not a model; give the base RWKV-6 "
            "model it was trained on, and pass the adapter with --adapter (generate.py, merge.py)")


# Elements per partial sum in is_finite: bounds the temporary of an exact (float64) re-check, so
# checking a 7B checkpoint never allocates a float64 copy of its largest tensor.
FINITE_CHUNK = 1 << 22


def _quick_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of is_finite's first, fast sum of a chunk: bf16 in its own dtype (torch's CPU and CUDA
    kernels accumulate it in float32 and read it without a widened copy: ~5x the speed of
    sum(dtype=float32), which converts first), float16 in float32 (its own range, 65504, is too small
    for a sum of weights to stay finite), float32 and float64 in their own."""
    return torch.float32 if dtype == torch.float16 else dtype


# Tensors with fewer elements are summed by one thread anyway (torch's parallel grain is 32768).
_ONE_THREAD_FROM = 1 << 16


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """torch's intra-op threads set to one, then restored. A sum is bound by memory bandwidth, and one
    core nearly saturates it; with two, every chunk's sum waits at an OpenMP barrier for the slower
    thread, which on a shared machine (the other core busy) costs ~10x the sum itself (measured:
    a 3 GB bf16 checkpoint checked in 0.3 s on one thread, 2-3 s on two)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def is_finite(t: Tensor) -> bool:
    """True when no element of a floating-point tensor is NaN or infinite (always for others).

    Per chunk, a fast sum first (see _quick_sum_dtype): a NaN or an infinity always makes it
    non-finite, so a finite sum clears the chunk. Only a non-finite one (a bad value, or finite values
    whose sum overflowed) is settled by a float64 sum: finite values (|x| < 3.4e38, fewer than 2^53
    of them) can never overflow a float64 sum, so that sum is finite exactly when every element is."""
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return True
    acc = torch.complex128 if t.is_complex() else torch.float64
    quick = None if t.is_complex() else _quick_sum_dtype(t.dtype)
    flat = t.reshape(-1)
    one = t.device.type == "cpu" and flat.numel() >= _ONE_THREAD_FROM
    with _one_cpu_thread() if one else contextlib.nullcontext():
        for i in range(0, flat.numel(), FINITE_CHUNK):
            chunk = flat[i:i + FINITE_CHUNK]
            if quick is not None and torch.isfinite(chunk.sum(dtype=quick)):
                continue
            if not torch.isfinite(chunk.sum(dtype=acc)):
                return False
    return True


def first_non_finite(tensors: Mapping[str, object]) -> str | None:
    """The first key whose floating-point tensor holds a NaN or an infinity, else None."""
    for key, t in tensors.items():
        if isinstance(t, Tensor) and not is_finite(t):
            return key
    return None


def converted_checked(sd: Mapping[str, Tensor], dtype: torch.dtype, device: str | torch.device,
                      source: str, keep: tuple[str, ...] = (".att.time_state",)) -> dict[str, Tensor]:
    """`sd` with every floating-point tensor cast to dtype on device (keys ending in `keep` only moved,
    in their own dtype) and checked for NaN/inf in the same pass: each chunk is checked just after
    it is written, while it is still in cache, so a load that converts reads the file once (not
    once for the check and again for the cast). A tensor already in place is checked where it
    lies. A UserError names the first tensor holding NaN or infinite values."""
    dev = torch.device(device)
    out = {}
    for key, t in sd.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            out[key] = t
            continue
        want = t.dtype if key.endswith(keep) else dtype
        if t.dtype == want and t.device == dev:
            if not is_finite(t):
                raise UserError(non_finite_message(source, key))
            out[key] = t
            continue
        dst = torch.empty(t.shape, dtype=want, device=dev)
        src, flat = t.reshape(-1), dst.view(-1)
        for i in range(0, flat.numel(), FINITE_CHUNK):
            piece = flat[i:i + FINITE_CHUNK]
            piece.copy_(src[i:i + FINITE_CHUNK])
            if not is_finite(piece):
                raise UserError(non_finite_message(source, key))
        out[key] = dst
    return out


def non_finite_message(source: str, key: str) -> str:
    return (f"{source} tensor {key} holds NaN or infinite values (a diverged run or a corrupt file); "
            "use an earlier checkpoint")


def validate_state_dict(sd: Mapping[str, Tensor], allow_extra_keys: bool = False, source: str = "the checkpoint") -> RWKV6Config:
    """Check `sd` (prefix-stripped) is a complete RWKV-6 state dict; return its inferred config."""
    if is_adapter_only(sd):
        raise UserError(adapter_not_model(source))
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserError(
            f"{source} has a non-tensor entry {bad[0]!r} (a converted or wrapped file?); "
            "expected a plain RWKV-6 state dict of tensors"
        )
    absent = [name for name, ok in (("emb.weight", "emb.weight" in sd), ("blocks.*", any(k.startswith("blocks.") for k in sd))) if not ok]
    if absent:
        found = ", ".join(list(sd)[:3]) or "no tensors"
        raise UserError(
            f"{source} does not look like an RWKV model (it has no {' or '.join(absent)} tensors; "
            f"found {found}); expected an RWKV-6 checkpoint"
        )
    other = detect_generation(sd)
    if other is not None:
        raise UserError(f"{source} is an {other} model, but rwkv-bone needs an RWKV-6 (x060) checkpoint")
    config = RWKV6Config.from_state_dict(sd)
    expected = config.expected_shapes()
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"{source} is missing tensor {missing[0]}{more}; expected a complete RWKV-6 model "
            f"with {config.n_layer} layers"
        )
    for key, shape in expected.items():
        found = tuple(sd[key].shape)
        if found != shape:
            raise UserError(
                f"{source} tensor {key} has shape {found} but {shape} was expected from the other "
                "tensors' shapes; the file is corrupt or not an RWKV-6 model"
            )
    states = config.state_shapes()  # learned initial states (state tuning): all layers or none
    held = [k for k in states if k in sd]
    if held and len(held) != len(states):
        missing = next(k for k in states if k not in sd)
        raise UserError(f"{source} holds learned initial states for some layers but not {missing}; "
                        "expected blocks.{i}.att.time_state for every layer or none")
    for key in held:
        if tuple(sd[key].shape) != states[key]:
            raise UserError(f"{source} tensor {key} has shape {tuple(sd[key].shape)} but {states[key]} "
                            "(n_head, head_size, head_size) was expected")
    extra = [k for k in sd if k not in expected and k not in states]
    if extra and not allow_extra_keys:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UserError(
            f"{source} has unexpected tensor {extra[0]}{more} beyond the RWKV-6 layout (adapter weights?); "
            "merge them first, or allow extra keys to ignore them"
        )
    return config


def _resolve(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.isfile(path + ".pth"):
        path += ".pth"  # the `rwkv` package convention: a model named without its .pth suffix
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path (an RWKV-6 .pth or .safetensors file)")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; pass the .pth file itself")
    return path


def _read(path: str, shapes_only: bool) -> dict[str, Tensor]:
    """The prefix-stripped tensors of a .pth / .safetensors file (mapped, or meta when shapes_only)."""
    if is_safetensors(path):
        return strip_prefixes(_safetensors_shapes(path) if shapes_only else _safetensors_load(path))
    obj = _torch_load(path)
    if isinstance(obj, dict):
        # Lightning .ckpt keeps the weights under "state_dict", DeepSpeed under "module".
        for nested in ("state_dict", "module"):
            if isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; expected an RWKV-6 .pth")
    sd = strip_prefixes(obj)
    if shapes_only:  # the mapped file is never read: only shapes and dtypes are kept
        sd = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, Tensor) else v
              for k, v in sd.items()}
    return sd


def load_state_dict(path: str | os.PathLike, allow_extra_keys: bool = False,
                    check_finite: bool = True) -> dict[str, Tensor]:
    """Read an RWKV-6 .pth or .safetensors into a prefix-stripped, validated state dict (tensors
    memory-mapped, not copied); raise UserError for missing files, unreadable files, other model
    generations, adapter files and (unless check_finite is False: a caller that checks every tensor
    as it streams them) weights holding NaN/inf."""
    path = _resolve(path)
    sd = _read(path, shapes_only=False)
    validate_state_dict(sd, allow_extra_keys=allow_extra_keys, source=path)
    if check_finite:
        bad = first_non_finite(sd)
        if bad is not None:
            raise UserError(non_finite_message(path, bad))
    return sd


def read_shapes(path: str | os.PathLike, allow_extra_keys: bool = False) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an RWKV-6 checkpoint, validated like load_state_dict but from the shapes alone:
    no weight is read (the values are not checked for NaN/inf)."""
    path = _resolve(path)
    sd = _read(path, shapes_only=True)
    validate_state_dict(sd, allow_extra_keys=allow_extra_keys, source=path)
    return {k: tuple(v.shape) for k, v in sd.items()}


def read_config(path: str | os.PathLike) -> RWKV6Config:
    """The RWKV6Config a checkpoint's shapes imply (validated; no weight is read)."""
    path = _resolve(path)
    return validate_state_dict(_read(path, shapes_only=True), allow_extra_keys=False, source=path)

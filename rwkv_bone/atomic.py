"""Atomic file writers: a reader sees the old file or the whole new one, never half of one, and a
failed write leaves no temporary file behind."""
from __future__ import annotations

import os
from typing import Any, Callable

from .errors import UserError


def atomic_path(path: str | os.PathLike) -> str:
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    path = os.fspath(path)
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp), fsync, then os.replace(tmp, path): readers see the old file or the whole new one,
    and the temporary file never outlives a failure."""
    tmp = atomic_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def text_atomic(text: str, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def check_writable_dir(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse early when the directory that will hold `path` cannot be written."""
    d = os.path.dirname(os.path.abspath(os.fspath(path))) or "."
    if not os.path.isdir(d):
        raise UserError(f"the {what} folder {d} does not exist; create it or choose another path")
    if not os.access(d, os.W_OK):
        raise UserError(f"the {what} folder {d} is not writable; choose another path")

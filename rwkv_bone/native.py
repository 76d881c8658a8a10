"""Small C libraries compiled on first use: where they are cached and how they are built.

The CPU decode kernel (gemv/) and the World tokenizer's trie (data/world_trie.c) ship as C source.
`build(source, flags)` compiles one with the system C compiler into $XDG_CACHE_HOME (or ~/.cache)
/rwkv_bone, names the library by a hash of the source, the flags and the compiler's version (so an
edited source or another compiler gives another file, never a stale one), writes it under a
temporary name and renames it (a crash or a concurrent build never leaves a half-written library),
and returns its path; a cached build is reused without running the compiler.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rwkv_bone"


def compiler() -> Optional[str]:
    """The C compiler: $CC, else the one Python was built with, else cc / gcc / clang on PATH."""
    names = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(source: Path, flags: Sequence[str]) -> Path:
    """Compile `source` into a shared library with `flags` (or reuse the cached build); its path.
    RuntimeError when there is no compiler or it fails (with the end of its message)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source.read_bytes() + repr((tuple(flags), cc, version)).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{source.stem}-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out

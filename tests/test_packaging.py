"""A wheel (pip wheel, non-editable) ships the CUDA kernel sources and the package finds them."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREE = ["setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "cuda", "rwkv_bone"]


@pytest.mark.slow
def test_wheel_ships_cuda_sources_and_the_unpacked_package_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in TREE:  # a copy, so the build leaves nothing in the checkout
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "cuda_src"))
        else:
            shutil.copy(p, src / name)
    out = tmp_path / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("rwkv_bone-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]  # `pip install .` -> rwkv-bone
    assert "rwkv-bone = rwkv_bone.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
    for n in ("wkv6_cuda.cu", "wkv6_op.cpp"):
        assert f"rwkv_bone/wkv/cuda_src/{n}" in names, names
    assert (zipfile.ZipFile(wheel).read("rwkv_bone/wkv/cuda_src/wkv6_cuda.cu")
            == (REPO / "cuda" / "wkv6_cuda.cu").read_bytes())
    assert (zipfile.ZipFile(wheel).read("rwkv_bone/gemv/gemv.c")  # the CPU decode kernel's source
            == (REPO / "rwkv_bone" / "gemv" / "gemv.c").read_bytes())
    assert (zipfile.ZipFile(wheel).read("rwkv_bone/data/world_trie.c")  # the World tokenizer's trie
            == (REPO / "rwkv_bone" / "data" / "world_trie.c").read_bytes())
    # The unpacked wheel, alone on the path (no checkout around it), resolves its own copy.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import rwkv_bone.wkv.cuda as c, sys; print(c.SOURCE_DIR); "
            "sys.exit(0 if all(p.is_file() for p in c.SOURCES) else 1)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Path(run.stdout.strip()) == site / "rwkv_bone" / "wkv" / "cuda_src"

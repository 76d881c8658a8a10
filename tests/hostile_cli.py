"""Running the command-line scripts as a user does, for the hostile-input tests (test_hostile_*.py).

(A module of helpers, not tests: pytest collects nothing from it.)"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from rwkv_bone.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
_SCRIPTS: dict[str, object] = {}


def script(name: str):
    """The module of ROOT/{name}.py (train, make_data, merge, generate), loaded once."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _SCRIPTS[name] = mod
    return _SCRIPTS[name]


def run_script(monkeypatch, capsys, name: str, *argv: str) -> tuple[int, str, str]:
    """`python {name}.py ARGV` in this process, through run_cli: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(script(name).main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def error_line(err: str) -> str:
    """The single `error: ...` line a user error must print (nothing else on stderr, no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def listing(folder: str | os.PathLike) -> list[str]:
    """Every file and folder under `folder` (relative paths), to show that nothing was added."""
    out = []
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)

"""`rwkv-bone TOOL ...`: one entry point for every tool (installed by `pip install .`).

    rwkv-bone train --model BASE.pth --data_file data/mydata --peft bone ...
    rwkv-bone make-data data.jsonl --output data/mydata
    rwkv-bone eval --model BASE.pth --adapter A.pth --data test.jsonl --task gsm8k
    rwkv-bone merge --model BASE.pth --adapter A.pth --output merged.pth
    rwkv-bone generate --model BASE.pth --prompt "User: hi\\n\\nAssistant:"

Each tool takes the flags of the matching top-level script (python train.py, make_data.py, ...).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from . import run_cli

# command -> module of rwkv_bone.cli holding its build_parser and main (imported only when chosen)
TOOLS = {"train": "train", "make-data": "make_data", "eval": "eval", "merge": "merge", "generate": "generate"}


def usage() -> str:
    return f"usage: rwkv-bone {{{','.join(TOOLS)}}} [--help] ...\n\n" + __doc__.split("\n\n")[0]


def dispatch(argv: Optional[list[str]] = None) -> int:
    """Run the tool named by argv[0] with the rest of argv; --help / no tool prints the usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"rwkv-bone: unknown tool {name!r}; choose one of {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    tool = importlib.import_module(f"{__package__}.{TOOLS[name]}")
    return tool.main(rest, prog=f"rwkv-bone {name}")


def main() -> None:
    """The console script: exit code 2 and one line for a user error, as every tool."""
    run_cli(dispatch)


if __name__ == "__main__":
    main()

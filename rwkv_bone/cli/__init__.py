"""The command-line tools: `rwkv-bone train|make-data|eval|merge|generate` (cli.main) and the
top-level scripts train.py, make_data.py, ... (thin shims over cli.<tool>). Each tool's parser lives
in a module that imports no torch, so `--help` answers at once; shared flags live in cli.args.

run_cli turns a UserError into one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from ..errors import UserError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


__all__ = ["EXIT_USER_ERROR", "run_cli"]

"""bench/bench_pack.py runs at a tiny size and reports packed vs padded real tokens/s."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_pack_reports_fill_and_the_ratio(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_pack.py"), "--docs", "40", "--ctx_len", "512",
                           "--n_layer", "1", "--n_embd", "64", "--vocab", "128", "--micro_bsz", "2", "--steps", "1",
                           "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    fill = re.search(r"fill: padded ([\d.]+), packed ([\d.]+)", done.stdout)
    assert fill and float(fill.group(2)) > float(fill.group(1)) > 0
    assert re.search(r"packed / padded real tokens/s: [\d.]+x", done.stdout)

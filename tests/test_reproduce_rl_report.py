"""bench/reproduce_rl.py's report: accuracies and paired p-values computed from per-item verdicts."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import reproduce_rl as rr  # noqa: E402

from rwkv_bone.eval.paired import mcnemar_exact  # noqa: E402


def test_report_states_accuracies_and_paired_tests(tmp_path):
    n = 50
    base = [i < 5 for i in range(n)]                      # 10%
    sft = [i < 15 for i in range(n)]                      # 30%: 10 more, none lost
    grpo = [[i < 30 for i in range(n)], [i < 25 for i in range(n)]]
    runs = {"base": [base], "sft": [sft, sft], "grpo": grpo}
    s = dict(rr.SETTINGS["quick"], seeds=(0, 1))
    out = tmp_path / "r.md"
    rr.write_report(str(out), s, "quick", runs, {"stages": {"GRPO train": [1.0, 2.0]}, "notes": {}}, 60.0, "cmd")
    text = out.read_text()
    assert re.search(r"\| SFT \(Bone-row b=64\) \| 30\.0 \| 30\.0 \| \*\*30\.0\*\* \|", text)
    assert re.search(r"\| SFT \+ GRPO \(--reward gsm8k\) \| 60\.0 \| 50\.0 \| \*\*55\.0\*\* \|", text)
    assert "SFT + DPO (own samples) | " in text and "not run" in text
    row = next(line for line in text.splitlines() if line.startswith("| SFT + GRPO vs SFT |"))
    # seed 0: 15 items only GRPO got right, none only SFT: McNemar p = 2 / 2^15
    assert f"+30.0, 15/0, {mcnemar_exact(sft, grpo[0]):.3g}" in row
    assert f"{2 / 2**15:.3g}" in row
    assert "| +25.0 |" in row                              # pooled difference over the seeds

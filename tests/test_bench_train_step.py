"""bench/bench_train_step.py: runs on CPU at a tiny size and reports what the paper's Table 6 needs."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_train_step.py"
TINY = ["--presets", "1.6b", "--n_layer", "2", "--n_embd", "128", "--vocab", "256", "--ctx_len", "32",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_reports_bone_and_lora_with_equal_trainable_counts(tmp_path):
    out = tmp_path / "train_step.json"
    done = subprocess.run([sys.executable, str(BENCH), *TINY, "--dtype", "bf16", "--methods", "bone,lora",
                           "--repeats", "2", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["method"], r["round"]) for r in runs] == [("bone", 0), ("lora", 0), ("lora", 1), ("bone", 1)]
    for r in runs:
        assert "error" not in r, r
        assert r["kt_s"] > 0 and len(r["step_s"]) == 2
        assert r["n_embd"] == 128 and r["dim_ffn"] == 448 and r["n_layer"] == 2
        # the bf16 setup of train.py: frozen base in bf16, what trains in fp32
        assert r["frozen_dtypes"] == ["torch.bfloat16"] and r["trained_dtypes"] == ["torch.float32"]
        # the paper's equal-parameter setting at full 1.6B size (counted on the meta device)
        assert r["trainable_at_preset_size"] == 33_030_144
    # Bone b=64 and LoRA r=32 train the same count at any size: 64 (7C + F) per block
    assert {r["trainable"] for r in runs} == {2 * 64 * (7 * 128 + 448)}
    rows = {row["method"]: row for row in result["summary"]}
    assert len(rows["bone"]["kt_s_all"]) == 2 and rows["lora"]["speed_vs_lora"] == 1.0
    assert rows["bone"]["speed_vs_lora"] > 0
    assert "| 1.6b | 1 | bone | 172,032 |" in done.stdout  # the table, as --report prints it


def test_report_prints_the_table_of_a_saved_run_without_running(tmp_path, capsys):
    bench = load_bench()
    runs = [dict(preset="3b", method=m, grad_cp=0, round=0, trainable=55_050_240, kt_s=kt,
                 peak_alloc_gb=mem, peak_reserved_gb=mem + 1.0) for m, kt, mem in
            (("bone", 2.0, 12.0), ("lora", 4.0, 10.0))]
    runs.append(dict(preset="3b", method="pissa", grad_cp=0, round=0, error="OutOfMemoryError: CUDA"))
    settings = dict(device="cuda", device_name="GPU", dtype="bf16", micro_bsz=1, ctx_len=512, steps=5,
                    warmup=2, repeats=1, wkv_path="CUDA kernel", torch="x")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"settings": settings, "runs": runs, "summary": bench.summarise(runs)}))
    assert bench.main(["--report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| 3b | 0 | bone | 55,050,240 | 2.00 | 2.00 | 12.00 (13.00) | 0.50 | 1.20 |" in text
    assert "| 3b | 0 | pissa | n/a | - [1 failed: OutOfMemoryError: CUDA] | n/a | n/a | n/a | n/a |" in text


def test_chunked_and_plain_ce_are_summarised_side_by_side():
    bench = load_bench()
    args = bench.parse_args(["--presets", "1.6b", "--methods", "bone,lora", "--ce", "chunked,plain", "--repeats", "2", "--device", "cpu"])
    sched = bench.schedule(args)
    assert [m for _, m, _, r in sched if r == 0] == ["bone|chunked", "bone|plain", "lora|chunked", "lora|plain"]
    assert bench.split_label("bone|plain", args) == ("bone", "plain")
    runs = [dict(preset="1.6b", method=m, grad_cp=1, round=0, trainable=1, kt_s=kt, peak_rss_gb=mem)
            for m, kt, mem in (("bone|chunked", 1.0, 1.0), ("bone|plain", 2.0, 4.0),
                               ("lora|chunked", 2.0, 1.5), ("lora|plain", 2.0, 5.0))]
    summary = bench.summarise(runs)
    rows = {r["method"]: r for r in summary}
    assert rows["bone|plain"]["speed_vs_lora"] == 1.0 and rows["bone|chunked"]["speed_vs_lora"] == 0.5
    (bone, lora) = bench.ce_memory_ratios(summary)
    assert "bone: peak memory chunked CE 1.00 GB / plain 4.00 GB = 0.25" in bone
    assert "= 0.30" in lora

"""train.py given hostile input: each mistake ends in one `error:` line and exit 2 before any file
is written; a diverging run keeps a state that --resume can continue from; Ctrl-C exits 130 naming
the state to resume from; Lightning's start-up banner is not shown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hostile_cli import error_line, listing, run_script
from test_train_helpers import REPO, TRAIN, base_flags, pattern_data, tiny_checkpoint, train_cli

LIGHTNING_NOISE = ("Tip:", "GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped",
                   "LOCAL_RANK", "litlogger", "litmodels")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rwkv_bone.data.binidx import write_binidx

    d = tmp_path_factory.mktemp("hostile_train")
    oov = str(d / "oov")
    # the out-of-vocabulary id sits in the last document, where early samples would not find it
    write_binidx(oov, [[1, 2, 3] * 30 + [0]] * 5 + [[5, 6, 7] * 10 + [100, 0]], np.uint16)
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern")),
            "oov": oov, "dir": d}


def train(monkeypatch, capsys, flags: list[str]) -> tuple[int, str, str]:
    return run_script(monkeypatch, capsys, "train", *flags)


def test_data_with_ids_beyond_the_vocab_is_refused_before_any_file_is_written(files, tmp_path, monkeypatch, capsys):
    proj = tmp_path / "run"
    code, out, err = train(monkeypatch, capsys, base_flags(files["ckpt"], files["oov"], str(proj)))
    assert code == 2 and out == ""
    assert error_line(err) == (
        f"error: {files['oov']}.bin holds token id 100 but the model's vocabulary has 64 ids (0..63); "
        "tokenise the data with the model's tokenizer (make_data.py --tokenizer) or train a model with a "
        "larger vocabulary")
    assert not proj.exists()  # no run.json, no metrics.csv
    with open(files["oov"] + ".maxid.json") as f:
        assert json.load(f)["max_id"] == 100


def test_token_id_range_is_cached_and_rescanned_when_the_bin_changes(tmp_path, monkeypatch):
    import rwkv_bone.atomic
    from rwkv_bone.data.binidx import MMapIndexedDataset, token_id_range, write_binidx

    prefix = str(tmp_path / "d")
    write_binidx(prefix, [[3, 9, 4, 0], [8, 0]], np.uint16)
    assert token_id_range(MMapIndexedDataset(prefix), chunk=3) == (0, 9)  # chunks that do not divide
    cache = prefix + ".maxid.json"
    saved = json.load(open(cache))
    json.dump({**saved, "max_id": 7}, open(cache, "w"))
    assert token_id_range(MMapIndexedDataset(prefix)) == (0, 7)  # read from the cache, not rescanned
    write_binidx(prefix, [[3, 300, 4, 0]], np.uint16)  # another size: the cache is stale
    assert token_id_range(MMapIndexedDataset(prefix)) == (0, 300)
    assert json.load(open(cache))["max_id"] == 300

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    os.remove(cache)
    monkeypatch.setattr(rwkv_bone.atomic, "text_atomic", read_only)  # a read-only data folder
    assert token_id_range(MMapIndexedDataset(prefix)) == (0, 300)
    assert not os.path.exists(cache)


def test_negative_token_ids_are_refused(files, tmp_path, monkeypatch, capsys):
    from rwkv_bone.data.binidx import write_binidx

    neg = str(tmp_path / "neg")
    write_binidx(neg, [[1, 2, 3] * 10 + [-4, 0]], np.int16)
    code, _, err = train(monkeypatch, capsys, base_flags(files["ckpt"], neg, str(tmp_path / "run")))
    assert code == 2 and "holds the negative token id -4" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_proj_dir_that_is_a_file_is_refused(files, tmp_path, monkeypatch, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, err = train(monkeypatch, capsys, base_flags(files["ckpt"], files["data"], str(f)))
    assert code == 2
    assert error_line(err) == f"error: --proj_dir {f} is an existing file, not a folder; choose another --proj_dir"
    assert f.read_text() == "mine" and listing(tmp_path) == ["notes.txt"]


def test_load_model_naming_a_folder_says_it_is_a_folder(files, tmp_path, monkeypatch, capsys):
    code, _, err = train(monkeypatch, capsys, base_flags(str(tmp_path), files["data"], str(tmp_path / "run")))
    assert code == 2
    assert error_line(err) == f"error: --load_model {tmp_path} is a folder; give the path of the RWKV-6 .pth file itself"
    assert listing(tmp_path) == []


@pytest.mark.parametrize("flag", ["lr_init", "lr_final", "adam_eps", "grad_clip", "weight_decay", "lora_alpha"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_in_flags_are_refused(files, tmp_path, monkeypatch, capsys, flag, value):
    code, _, err = train(monkeypatch, capsys, base_flags(files["ckpt"], files["data"], str(tmp_path / "run"),
                                                         **{flag: value}))
    assert code == 2
    assert error_line(err) == f"error: --{flag} {value} is not a finite number; give a plain number"
    assert listing(tmp_path) == []


def _no_noise(text: str) -> None:
    for noise in LIGHTNING_NOISE:
        assert noise not in text, text


@pytest.mark.slow
def test_after_divergence_resume_with_a_lower_lr_continues(files, tmp_path):
    """The lr grows 10x per step until the loss is NaN at some step s; the state kept is that of step
    s - 2, whose next forward pass (step s - 1) was finite, not that of step s - 1 (whose forward is
    NaN), so a resume with a small lr trains to the end."""
    proj = str(tmp_path / "run")
    flags = base_flags(files["ckpt"], files["data"], proj, epoch_steps=10, epoch_count=1, save_every_steps=1)
    ramp = ["--lr_init", "1e-2", "--lr_final", "1e9", "--lr_schedule", "exp"]
    r = train_cli(flags + ramp, process=True)  # Lightning's noise is checked in a real process
    assert r.returncode == 1, r.stdout + r.stderr
    _no_noise(r.stdout + r.stderr)
    m = [ln for ln in r.stdout.splitlines() if ln.startswith("error: the loss became nan at step ")]
    assert len(m) == 1 and "rerun with --resume" in m[0], r.stdout
    diverged_at = int(m[0].split("at step ")[1].split(",")[0])
    assert 3 <= diverged_at <= 10
    state = torch.load(os.path.join(proj, "last-state.pth"), weights_only=True)
    assert state["step"] == diverged_at - 2

    r = train_cli(flags + ["--lr_init", "1e-3", "--resume"], process=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _no_noise(r.stdout + r.stderr)
    assert f"steps {diverged_at - 2} -> 10" in r.stdout
    assert torch.load(os.path.join(proj, "last-state.pth"), weights_only=True)["step"] == 10
    rows = open(os.path.join(proj, "metrics.csv")).read().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, 11))
    assert all(np.isfinite(float(row.split(",")[1])) for row in rows)


@pytest.mark.slow
def test_ctrl_c_exits_130_naming_the_state_to_resume_from(files, tmp_path):
    proj = tmp_path / "run"
    flags = base_flags(files["ckpt"], files["data"], str(proj), epoch_steps=2000, epoch_count=1, save_every_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # SIGINT as a terminal's Ctrl-C delivers it (a shell's background job would inherit it ignored)
    proc = subprocess.Popen([sys.executable, TRAIN, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not (proj / "last-state.pth").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    _no_noise(out + err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    saved = torch.load(proj / "last-state.pth", weights_only=True)["step"]
    assert saved >= 2 and saved % 2 == 0
    assert lines[0].startswith("interrupted at step ")
    assert lines[0].endswith(f"; the training state of step {saved} is in {proj / 'last-state.pth'}: "
                             "rerun the same command with --resume to continue")
    assert not [n for n in os.listdir(proj) if ".tmp" in n]  # no half-written file


@pytest.mark.slow
def test_deepspeed_two_ranks_give_one_vocab_message(files, tmp_path):
    proj = tmp_path / "run"
    r = train_cli(base_flags(files["ckpt"], files["oov"], str(proj), strategy="deepspeed_stage_2", devices=2,
                             epoch_steps=2, epoch_count=1))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert "holds token id 100 but the model's vocabulary has 64 ids" in error_line(r.stderr)
    assert not proj.exists()


def test_data_file_naming_a_folder_says_it_is_a_folder(files, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code, _, err = train(monkeypatch, capsys, base_flags(files["ckpt"], str(data), str(tmp_path / "run")))
    assert code == 2
    assert error_line(err) == (f"error: --data_file {data} is a folder; give the binidx prefix of the data in it "
                               "(PREFIX for PREFIX.bin / PREFIX.idx)")
    assert listing(tmp_path) == ["data"]


@pytest.mark.parametrize("strategy,name,content", [
    ("deepspeed_stage_2", "last-state.json", "{not json"),
    ("deepspeed_stage_2", "last-state.json", '{"step": 3}'),
    ("auto", "last-state.pth", None),  # a torch file without the state's entries
])
def test_resume_from_a_damaged_state_is_one_sentence(files, tmp_path, monkeypatch, capsys, strategy, name, content):
    proj = tmp_path / "run"
    proj.mkdir()
    if content is None:
        torch.save({"format": "rwkv-bone-train-state", "step": 2}, proj / name)
    else:
        (proj / name).write_text(content)
    before = listing(tmp_path)
    code, _, err = train(monkeypatch, capsys, base_flags(files["ckpt"], files["data"], str(proj), strategy=strategy,
                                                         resume=True))
    assert code == 2
    assert error_line(err).startswith(f"error: --resume: {proj / name} is not a ")
    assert listing(tmp_path) == before


def test_plot_output_naming_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    from rwkv_bone.cli import run_cli
    from rwkv_bone.plot import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss,lr,tokens,kt/s,peak_mem_mb\n1,2.0,0.1,16,1.0,1.0\n")
    out = tmp_path / "figures"
    out.mkdir()
    monkeypatch.setattr(sys, "argv", ["plot", str(run), "--output", str(out)])
    with pytest.raises(SystemExit) as e:
        run_cli(plot_main)
    assert e.value.code == 2
    assert error_line(capsys.readouterr().err) == f"error: --output {out} is a folder; give the path of the .png file to write"
    assert listing(tmp_path) == ["figures", "run", "run/metrics.csv"]


def test_a_run_reads_the_checkpoint_once(files, tmp_path, monkeypatch):
    import rwkv_bone.checkpoint as ckpt
    from rwkv_bone.train import parse_args
    from rwkv_bone.train.run import build_run

    reads = []
    real = ckpt._torch_load
    monkeypatch.setattr(ckpt, "_torch_load", lambda path: reads.append(path) or real(path))
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], str(tmp_path / "run"))))
    assert reads == [files["ckpt"]]
    base = torch.load(files["ckpt"], weights_only=True)
    assert torch.equal(tr.module.model.state_dict()["blocks.1.att.key.weight"], base["blocks.1.att.key.weight"])

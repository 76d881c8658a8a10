"""End-to-end training runs in this process (tiny model, CPU, fp32) and the user errors of train.py."""
from __future__ import annotations

import csv
import json
import math
import os
import re

import pytest
import pytorch_lightning as pl
import torch

from rwkv_bone.errors import UserError
from rwkv_bone.train import parse_args, run
from rwkv_bone.train.run import build_run, fit_run

from test_train_helpers import VOCAB, base_flags, pattern_data, sft_data, tiny_checkpoint, train_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_run")
    return {"ckpt": tiny_checkpoint(str(d / "tiny.pth")), "data": pattern_data(str(d / "pattern")), "dir": d}


def metrics(proj: str) -> list[dict]:
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_only_adapter_tensors_change(files, tmp_path):
    proj = str(tmp_path / "run")
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], proj, epoch_count=3)))
    assert fit_run(tr) == 0
    rows = metrics(proj)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # a repeating pattern is learnable

    base = torch.load(files["ckpt"], weights_only=True)
    trained = tr.module.model.state_dict()
    for k, v in base.items():  # every base tensor is bit-identical after training
        assert torch.equal(trained[k], v), k
    adapter = torch.load(os.path.join(proj, "rwkv-2.pth"), weights_only=True)
    meta = json.loads(adapter.pop("__peft__"))
    assert meta["method"] == "bone" and meta["bone_b"] == 16 and meta["extra"]["step"] == 12
    assert adapter and all(k.endswith(".bone") for k in adapter)
    for k, v in adapter.items():
        assert torch.equal(trained[k], v) and v.abs().sum() > 0, k
    assert {"rwkv-0.pth", "rwkv-1.pth", "rwkv-2.pth", "loss.png", "last-state.pth", "run.json"} <= set(os.listdir(proj))

    log = open(os.path.join(proj, "train_log.txt")).read().splitlines()
    assert log[0].startswith("NEW RUN ")
    epoch_lines = [ln for ln in log if re.fullmatch(r"\d+ \d+\.\d{6} \d+\.\d{4} \d\.\d{8} \S+ \S+ \d+", ln)]
    assert [ln.split()[0] for ln in epoch_lines] == ["0", "1", "2"]
    first = epoch_lines[0].split()
    assert float(first[1]) == pytest.approx(sum(losses[:4]) / 4, abs=1e-5)
    assert float(first[2]) == pytest.approx(2.718281828 ** float(first[1]), rel=1e-3)


def test_trained_adapter_loads_and_changes_the_model(files, tmp_path):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import load_adapter

    proj = str(tmp_path / "lora")
    assert run(parse_args(base_flags(files["ckpt"], files["data"], proj, peft="lora", lora_r=4,
                                     epoch_count=1, train_parts="ln"))) == 0
    x = torch.randint(1, VOCAB, (1, 12))
    plain = RWKV6.from_checkpoint(files["ckpt"])
    adapted = RWKV6.from_checkpoint(files["ckpt"])
    load_adapter(adapted, os.path.join(proj, "rwkv-0.pth"))
    assert not torch.allclose(plain(x), adapted(x))
    keys = torch.load(os.path.join(proj, "rwkv-0.pth"), weights_only=True)
    assert "blocks.0.ln1.weight" in keys and "blocks.1.att.key.lora_A" in keys


def test_pissa_adapter_file_reproduces_the_trained_model(files, tmp_path):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft.adapter_io import load_adapter

    proj = str(tmp_path / "pissa")
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], proj, peft="pissa", pissa_r=4,
                                         bone_b=None, epoch_count=1, lr_init=1e-3)))
    assert fit_run(tr) == 0
    x = torch.randint(1, VOCAB, (2, 12))
    loaded = RWKV6.from_checkpoint(files["ckpt"])
    load_adapter(loaded, os.path.join(proj, "rwkv-0.pth"))
    tr.module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tr.module.model(x), rtol=1e-5, atol=1e-5)


def test_bf16_stores_frozen_weights_in_bf16_and_trains_fp32_tensors(files, tmp_path):
    proj = str(tmp_path / "bf16")
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], proj, precision="bf16", grad_cp=1,
                                         epoch_count=1, epoch_steps=3)))
    assert fit_run(tr) == 0
    params = dict(tr.module.model.named_parameters())
    assert params["blocks.0.att.key.weight"].dtype == torch.bfloat16 and not params["emb.weight"].requires_grad
    assert params["blocks.0.att.key.bone"].dtype == torch.float32
    saved = torch.load(os.path.join(proj, "rwkv-0.pth"), weights_only=True)
    assert saved["blocks.0.att.key.bone"].dtype == torch.float32
    assert torch.equal(saved["blocks.0.att.key.bone"], params["blocks.0.att.key.bone"].detach())
    assert all(float(r["loss"]) < 10 for r in metrics(proj))


def test_sft_run_trains(files, tmp_path):
    docs = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0], [20, 21, 22, 23, 24, 0]] * 4
    masks = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]] * 4
    data = sft_data(str(tmp_path / "sft"), docs, masks)
    proj = str(tmp_path / "out")
    assert run(parse_args(base_flags(files["ckpt"], data, proj, data_type="sft", ctx_len=12, epoch_count=1))) == 0
    assert os.path.isfile(os.path.join(proj, "rwkv-0.pth"))
    with open(os.path.join(proj, "metrics.csv"), newline="") as f:
        assert next(csv.reader(f)) == ["step", "loss", "lr", "tokens", "kt/s", "peak_mem_mb", "valid_loss",
                                       "valid_ppl", "valid_acc"]
    rows = metrics(proj)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["tokens"]) for r in rows] == [24, 48, 72, 96]  # micro_bsz 2 x ctx_len 12 per step
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert all(float(r["lr"]) == pytest.approx(1e-2) and float(r["kt/s"]) > 0 for r in rows)
    assert all(r["valid_loss"] == r["valid_ppl"] == r["valid_acc"] == "" for r in rows)  # no validation asked


def test_from_scratch_writes_a_full_official_checkpoint(files, tmp_path):
    from rwkv_bone.model import RWKV6

    proj = str(tmp_path / "scratch")
    flags = base_flags("", files["data"], proj, peft="none", epoch_count=1, epoch_steps=2, bone_b=None)
    flags[flags.index("--load_model") + 1] = ""
    assert run(parse_args(flags + ["--n_layer", "2", "--n_embd", "64", "--vocab_size", str(VOCAB)])) == 0
    model = RWKV6.from_checkpoint(os.path.join(proj, "rwkv-0.pth"))
    assert model.config.n_layer == 2 and model.config.vocab_size == VOCAB


def test_full_fine_tuning_writes_the_whole_updated_model(files, tmp_path):
    from rwkv_bone.model import RWKV6

    proj = str(tmp_path / "full")
    assert run(parse_args(base_flags(files["ckpt"], files["data"], proj, peft="none", bone_b=None,
                                     epoch_count=1, epoch_steps=2, lr_init=1e-3))) == 0
    tuned = RWKV6.from_checkpoint(os.path.join(proj, "rwkv-0.pth")).state_dict()
    base = torch.load(files["ckpt"], weights_only=True)
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["blocks.1.att.key.weight"], base["blocks.1.att.key.weight"])


class PoisonHead(pl.Callback):
    """Makes the logits infinite after optimizer step `after`."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.after:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("inf"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(files, tmp_path, capsys):
    proj = str(tmp_path / "nan")
    tr = build_run(parse_args(base_flags(files["ckpt"], files["data"], proj, epoch_count=3)))
    tr.trainer.callbacks.append(PoisonHead(after=5))
    assert fit_run(tr) == 1
    out = capsys.readouterr().out
    assert "error: the loss became nan" in out and "at step 6" in out
    assert sorted(f for f in os.listdir(proj) if f.endswith(".pth")) == ["last-state.pth", "rwkv-0.pth"]
    assert torch.load(os.path.join(proj, "last-state.pth"), weights_only=True)["step"] == 4
    assert len(metrics(proj)) == 5


# ---- user errors -------------------------------------------------------------------------------
def test_missing_data_file_is_a_user_error(files, tmp_path):
    with pytest.raises(UserError, match=r"the data file .*nothere\.bin does not exist"):
        run(parse_args(base_flags(files["ckpt"], str(tmp_path / "nothere"), str(tmp_path / "o"))))


def test_data_shorter_than_ctx_len_is_a_user_error(files, tmp_path):
    from rwkv_bone.data.binidx import write_binidx

    import numpy as np

    write_binidx(str(tmp_path / "short"), [[1, 2, 3, 0]], np.uint16)
    with pytest.raises(UserError, match="holds 4 tokens, fewer than ctx_len \\+ 1 = 17"):
        run(parse_args(base_flags(files["ckpt"], str(tmp_path / "short"), str(tmp_path / "o"))))


def test_sft_without_mask_files_is_a_user_error(files, tmp_path):
    with pytest.raises(UserError, match="--data_type sft needs the loss-mask files"):
        run(parse_args(base_flags(files["ckpt"], files["data"], str(tmp_path / "o"), data_type="sft")))


def test_bone_block_size_that_does_not_divide_is_a_user_error(files, tmp_path):
    with pytest.raises(UserError, match="Bone block size 48 does not divide"):
        run(parse_args(base_flags(files["ckpt"], files["data"], str(tmp_path / "o"), bone_b=48)))


def test_resume_without_state_is_a_user_error(files, tmp_path):
    with pytest.raises(UserError, match="--resume: no training state in"):
        run(parse_args(base_flags(files["ckpt"], files["data"], str(tmp_path / "o"), resume=True)))


def test_resume_with_other_settings_is_a_user_error(files, tmp_path):
    proj = str(tmp_path / "o")
    assert run(parse_args(base_flags(files["ckpt"], files["data"], proj, epoch_count=1))) == 0
    with pytest.raises(UserError, match="the saved run used --bone_b 16 but this one has 32"):
        run(parse_args(base_flags(files["ckpt"], files["data"], proj, epoch_count=1, bone_b=32, resume=True)))


def test_checkpoint_that_is_not_rwkv6_is_a_user_error(files, tmp_path):
    path = str(tmp_path / "rwkv7.pth")
    torch.save({"emb.weight": torch.zeros(8, 4), "blocks.0.att.w0": torch.zeros(1, 1, 4)}, path)
    with pytest.raises(UserError, match="RWKV-7"):
        run(parse_args(base_flags(path, files["data"], str(tmp_path / "o"))))


def test_cli_prints_one_line_and_exits_2_on_user_error(tmp_path):
    r = train_cli(["--load_model", str(tmp_path / "missing.pth"), "--data_file", "x"], process=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --load_model {tmp_path / 'missing.pth'} does not exist; "
                                             "give the path of an RWKV-6 .pth file"]


# ---- dry run ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, count", [
    (["--model_preset", "7b", "--peft", "bone", "--bone_b", "64"], "88,080,384"),
    (["--model_preset", "1.6b", "--peft", "lora", "--lora_r", "32"], "33,030,144"),
    (["--model_preset", "3b", "--peft", "pissa", "--pissa_r", "32"], "55,050,240"),
])
def test_dry_run_prints_the_trainable_count_of_the_paper(flags, count, capsys):
    assert run(parse_args(flags + ["--dry_run"])) == 0
    assert f"trainable parameters: {count}\n" in capsys.readouterr().out


def test_dry_run_reads_dims_from_the_checkpoint(files, capsys):
    assert run(parse_args(["--load_model", files["ckpt"], "--peft", "bone", "--bone_b", "16", "--dry_run"])) == 0
    out = capsys.readouterr().out
    assert "L=2 C=64" in out and "V=64" in out
    assert f"trainable parameters: {2 * (4 * 64 + 64 + 64 + 64 + 224) * 16:,}" in out


# ---- plot ---------------------------------------------------------------------------------------
def test_plot_overlays_runs_labelled_from_their_settings(tmp_path):
    from rwkv_bone import plot

    for name, settings in (("a", {"peft": "bone", "bone_mode": "row", "bone_b": 64}),
                           ("b", {"peft": "lora", "lora_r": 32})):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.csv").write_text("step,loss,lr,tokens,kt/s,peak_mem_mb\n" +
                                       "".join(f"{s},{3 - s / 10},2e-05,{s * 512},1.0,10\n" for s in range(1, 21)))
        (d / "run.json").write_text(json.dumps(settings))
    assert plot.run_label(str(tmp_path / "a")) == "Bone-row b=64"
    assert plot.run_label(str(tmp_path / "b")) == "LoRA r=32"
    assert plot.plot_labels([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")]) == \
        ["Bone-row b=64 [a]", "LoRA r=32", "Bone-row b=64 [a]"]
    out = str(tmp_path / "cmp.png")
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", out, "--x", "tokens"]) == 0
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="metrics.csv does not exist"):
        plot.main([str(tmp_path / "nothing")])


def test_chunked_and_plain_cross_entropy_train_the_same_adapter(files, tmp_path):
    docs = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0], [20, 21, 22, 23, 24, 0]] * 4
    masks = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]] * 4
    data = sft_data(str(tmp_path / "sft"), docs, masks)
    adapters = []
    for chunked in (0, 1):
        proj = str(tmp_path / f"ce{chunked}")
        flags = base_flags(files["ckpt"], data, proj, data_type="sft", ctx_len=12, epoch_count=1,
                           chunked_ce=chunked, l2wrap=1)
        assert run(parse_args(flags)) == 0
        sd = torch.load(os.path.join(proj, "rwkv-0.pth"), weights_only=True)
        sd.pop("__peft__")
        adapters.append(sd)
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        assert adapters[0][k].abs().sum() > 0
        torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=1e-4, atol=1e-6)


def test_l2wrap_defaults_on_for_full_training_and_off_for_adapters(files):
    assert parse_args(base_flags(files["ckpt"], files["data"], "x", peft="none", bone_b=None)).l2wrap is True
    assert parse_args(base_flags(files["ckpt"], files["data"], "x")).l2wrap is False
    assert parse_args(base_flags(files["ckpt"], files["data"], "x", l2wrap=1)).l2wrap is True

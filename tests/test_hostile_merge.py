"""merge.py given hostile input: NaN/inf adapters, merges that overflow, --output naming one of the
inputs or a folder, a whole model passed as the adapter: one `error:` line, exit 2, nothing written
and the inputs untouched."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from conftest import random_model
from hostile_cli import error_line, listing, run_script
from rwkv_bone.peft import apply_peft, save_adapter


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def inputs(tmp_path):
    """base.pth, a trained-looking Bone adapter.pth and its peer (no metadata) twin peer.pth."""
    base = tmp_path / "base.pth"
    model = random_model(0)
    model.save_checkpoint(base)
    apply_peft(model, "bone", bone_b=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bone"):
                p.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter.pth")
    sd = torch.load(tmp_path / "adapter.pth", weights_only=True)
    torch.save({k: v for k, v in sd.items() if k != "__peft__"}, tmp_path / "peer.pth")
    return {"dir": tmp_path, "base": str(base), "adapter": str(tmp_path / "adapter.pth"),
            "peer": str(tmp_path / "peer.pth"), "digests": {n: digest(tmp_path / n) for n in os.listdir(tmp_path)}}


def merge(monkeypatch, capsys, *argv) -> tuple[int, str]:
    code, out, err = run_script(monkeypatch, capsys, "merge", *argv)
    return code, err


def unchanged(inputs) -> bool:
    d = inputs["dir"]
    return {n: digest(d / n) for n in os.listdir(d)} == inputs["digests"]


@pytest.mark.parametrize("which", ["adapter", "peer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused(inputs, monkeypatch, capsys, which, bad):
    sd = torch.load(inputs[which], weights_only=True)
    key = "blocks.1.ffn.value.bone"
    sd[key][2, 3, 4] = bad
    path = str(inputs["dir"] / f"bad_{which}.pth")
    torch.save(sd, path)
    inputs["digests"]["bad_" + which + ".pth"] = digest(path)
    out = inputs["dir"] / "merged.pth"
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", path, "--output", out)
    assert code == 2
    assert error_line(err) == (f"error: adapter {path} tensor {key} holds NaN or infinite values (a diverged "
                               "run?); use an adapter saved before the loss became non-finite")
    assert not out.exists() and unchanged(inputs)


def test_merge_that_overflows_is_refused_and_writes_nothing(inputs, monkeypatch, capsys):
    sd = torch.load(inputs["adapter"], weights_only=True)
    sd["blocks.0.att.key.bone"].fill_(3e38)  # finite, but W + delta overflows float32
    path = str(inputs["dir"] / "huge.pth")
    torch.save(sd, path)
    inputs["digests"]["huge.pth"] = digest(path)
    out = inputs["dir"] / "merged.pth"
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", path, "--output", out)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: merging {path} into {inputs['base']} gives NaN or infinite values in "
                           "blocks.0.att.key.weight")
    assert line.endswith("; nothing was written")
    assert not out.exists() and unchanged(inputs)


@pytest.mark.parametrize("target,flag", [("base", "--base"), ("base_link", "--base"), ("adapter", "--adapter")])
def test_output_naming_an_input_is_refused(inputs, monkeypatch, capsys, target, flag):
    out = inputs["base"] if target == "base" else inputs["adapter"]
    if target == "base_link":  # another name for the same file
        out = str(inputs["dir"] / "link.pth")
        os.symlink(inputs["base"], out)
        inputs["digests"]["link.pth"] = digest(out)
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", inputs["adapter"], "--output", out)
    assert code == 2
    assert error_line(err) == (f"error: --output {out} is the {flag} file; merging would overwrite it, "
                               "so choose another output path")
    assert unchanged(inputs)


def test_output_naming_a_folder_is_refused(inputs, monkeypatch, capsys):
    folder = inputs["dir"].parent / (inputs["dir"].name + "_models")
    folder.mkdir()
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", inputs["adapter"],
                      "--output", folder)
    assert code == 2
    assert error_line(err) == f"error: --output {folder} is a folder; give the path of the .pth file to write"
    assert listing(folder) == [] and unchanged(inputs)


def test_a_whole_model_given_as_the_adapter_is_refused(inputs, monkeypatch, capsys):
    other = inputs["dir"] / "other.pth"
    random_model(1).save_checkpoint(other)
    inputs["digests"]["other.pth"] = digest(other)
    out = inputs["dir"] / "merged.pth"
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", other, "--output", out)
    assert code == 2
    assert error_line(err) == (f"error: adapter {other} is a whole RWKV-6 model, not an adapter; use it directly "
                               "as the model (--model / --base) or pass the adapter file trained on it")
    assert not out.exists() and unchanged(inputs)


@pytest.mark.parametrize("alpha", ["nan", "inf"])
def test_non_finite_lora_alpha_is_refused(inputs, monkeypatch, capsys, alpha):
    out = inputs["dir"] / "merged.pth"
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", inputs["peer"],
                      "--output", out, "--lora_alpha", alpha)
    assert code == 2
    assert error_line(err) == f"error: --lora_alpha {alpha} is not a finite number; give the alpha used in training"
    assert not out.exists() and unchanged(inputs)


def test_a_good_merge_still_writes_its_output(inputs, monkeypatch, capsys):
    out = inputs["dir"] / "merged.pth"
    code, err = merge(monkeypatch, capsys, "--base", inputs["base"], "--adapter", inputs["adapter"], "--output", out)
    assert code == 0 and err == "" and out.exists() and unchanged_but(inputs, "merged.pth")


def unchanged_but(inputs, new: str) -> bool:
    d = inputs["dir"]
    return {n: digest(d / n) for n in os.listdir(d) if n != new} == inputs["digests"]


def test_output_naming_the_base_given_without_its_suffix_is_refused(inputs, monkeypatch, capsys):
    stem = inputs["base"][:-len(".pth")]  # the rwkv package's way of naming a model
    code, err = merge(monkeypatch, capsys, "--base", stem, "--adapter", inputs["adapter"], "--output", inputs["base"])
    assert code == 2
    assert error_line(err) == (f"error: --output {inputs['base']} is the --base file; merging would overwrite it, "
                               "so choose another output path")
    assert unchanged(inputs)

"""generate.py given hostile input: NaN/inf sampling settings, NaN/inf or overflowing adapters, a
whole model as the adapter, a folder as the tokenizer: one `error:` line, exit 2, no text printed."""
from __future__ import annotations

import pytest
import torch

from conftest import random_model
from hostile_cli import error_line, run_script
from rwkv_bone.peft import apply_peft, save_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_generate")
    model = random_model(0)
    model.save_checkpoint(d / "base.pth")
    apply_peft(model, "bone", bone_b=32)
    save_adapter(model, d / "adapter.pth")
    return {"dir": d, "base": str(d / "base.pth"), "adapter": str(d / "adapter.pth")}


def generate(monkeypatch, capsys, *argv) -> tuple[int, str]:
    code, out, err = run_script(monkeypatch, capsys, "generate", *argv)
    assert out == ""  # not even the newline after an empty continuation
    return code, error_line(err)


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "temperature nan is not a finite number; use 0 for greedy decoding or a "
                               "positive value such as 1.0"),
    (["--temperature", "inf"], "temperature inf is not a finite number; use 0 for greedy decoding or a "
                               "positive value such as 1.0"),
    (["--temperature", "-1"], "temperature -1.0 is negative; use 0 for greedy decoding or a positive value "
                              "such as 1.0"),
    (["--top_p", "nan"], "top_p nan is not a number; use a value in (0, 1] such as 0.85 (1 keeps every token)"),
    (["--top_p", "inf"], "top_p inf is outside (0, 1]; use e.g. 0.85 (1 keeps every token)"),
])
def test_sampling_settings_that_are_not_numbers_say_so(files, monkeypatch, capsys, flags, message):
    code, line = generate(monkeypatch, capsys, "--model", files["base"], "--prompt", "hi", *flags)
    assert code == 2 and line == f"error: {message}"


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_adapter_is_refused(files, tmp_path, monkeypatch, capsys, bad):
    sd = torch.load(files["adapter"], weights_only=True)
    sd["blocks.0.ffn.key.bone"][0, 1, 2] = bad
    path = str(tmp_path / "bad.pth")
    torch.save(sd, path)
    code, line = generate(monkeypatch, capsys, "--model", files["base"], "--adapter", path, "--prompt", "hi")
    assert code == 2
    assert line == (f"error: adapter {path} tensor blocks.0.ffn.key.bone holds NaN or infinite values (a diverged "
                    "run?); use an adapter saved before the loss became non-finite")


def test_adapter_that_overflows_when_folded_in_is_refused(files, tmp_path, monkeypatch, capsys):
    sd = torch.load(files["adapter"], weights_only=True)
    sd["blocks.1.att.value.bone"].fill_(3e38)
    path = str(tmp_path / "huge.pth")
    torch.save(sd, path)
    code, line = generate(monkeypatch, capsys, "--model", files["base"], "--adapter", path, "--prompt", "hi")
    assert code == 2
    assert line == (f"error: folding {path} into {files['base']} gives NaN or infinite values in "
                    "blocks.1.att.value.weight (adapter values too large, or a wrong --lora_alpha?); check the adapter")


def test_a_whole_model_given_as_the_adapter_is_refused(files, monkeypatch, capsys):
    code, line = generate(monkeypatch, capsys, "--model", files["base"], "--adapter", files["base"], "--prompt", "hi")
    assert code == 2
    assert line == (f"error: adapter {files['base']} is a whole RWKV-6 model, not an adapter; use it directly as "
                    "the model (--model / --base) or pass the adapter file trained on it")


def test_a_folder_as_the_tokenizer_says_it_is_a_folder(files, tmp_path, monkeypatch, capsys):
    code, line = generate(monkeypatch, capsys, "--model", files["base"], "--prompt", "hi", "--tokenizer", tmp_path)
    assert code == 2
    assert line == f"error: --tokenizer {tmp_path} is a folder; pass the tokenizer.json or World vocab .txt file in it"

"""Every place that expects a model (train.py --load_model, merge.py --base, generate.py --model)
refuses an adapter file and a model with NaN/inf weights with the same one sentence, exit 2, and
writes nothing."""
from __future__ import annotations

import pytest
import torch

from hostile_cli import error_line, listing, run_script
from test_train_helpers import base_flags, pattern_data, tiny_checkpoint

CLIS = ("train", "merge", "generate")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_models")
    ckpt = tiny_checkpoint(str(d / "base.pth"))
    return {"dir": d, "ckpt": ckpt, "data": pattern_data(str(d / "pattern")), "ours": _our_adapter(ckpt, d)}


def _our_adapter(ckpt: str, d) -> str:
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import apply_peft, save_adapter

    model = RWKV6.from_checkpoint(ckpt)
    apply_peft(model, "bone", bone_b=16)
    save_adapter(model, d / "ours.pth")
    return str(d / "ours.pth")


PEER_FILES = {  # RWKV-PEFT adapter-only files: tensors beside a linear, or the tuned initial state
    "peer_bone": {"blocks.0.att.key.bone": torch.randn(4, 16, 16), "blocks.1.ffn.key.bone": torch.randn(4, 16, 16)},
    "peer_simple_bone": {"blocks.0.att.key.bone": torch.randn(16, 64)},
    "peer_lora": {"blocks.0.att.key.lora_A": torch.randn(4, 64), "blocks.0.att.key.lora_B": torch.zeros(64, 4),
                  "blocks.0.ln1.weight": torch.ones(64)},
    "peer_disha": {"blocks.0.att.key.disha": torch.randn(16, 64)},
    "state_tuning": {"blocks.0.att.time_state": torch.zeros(1, 64, 64), "blocks.1.att.time_state": torch.zeros(1, 64, 64)},
}


def model_argv(cli: str, model: str, files, out) -> list[str]:
    if cli == "train":
        return base_flags(model, files["data"], str(out / "run"))
    if cli == "merge":
        return ["--base", model, "--adapter", files["ours"], "--output", str(out / "merged.pth")]
    return ["--model", model, "--prompt", "hi", "--max_tokens", "3"]


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("kind", ["ours", *PEER_FILES])
def test_an_adapter_given_as_the_model_is_named_an_adapter(files, tmp_path, monkeypatch, capsys, cli, kind):
    path = files["ours"] if kind == "ours" else str(tmp_path / f"{kind}.pth")
    if kind != "ours":
        torch.save(PEER_FILES[kind], path)
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_script(monkeypatch, capsys, cli, *model_argv(cli, path, files, out))
    assert code == 2 and stdout == ""
    assert error_line(err) == (f"error: {path} is an adapter (it holds only adapter tensors), not a model; give "
                               "the base RWKV-6 model it was trained on, and pass the adapter with --adapter "
                               "(generate.py, merge.py)")
    assert listing(out) == []


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_model_with_non_finite_weights_is_refused_at_load(files, tmp_path, monkeypatch, capsys, cli, bad):
    sd = torch.load(files["ckpt"], weights_only=True)
    sd["blocks.1.att.value.weight"][5, 7] = bad
    path = str(tmp_path / "diverged.pth")
    torch.save(sd, path)
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_script(monkeypatch, capsys, cli, *model_argv(cli, path, files, out))
    assert code == 2 and stdout == ""  # generate.py printed nothing and said nothing before
    assert error_line(err) == (f"error: {path} tensor blocks.1.att.value.weight holds NaN or infinite values (a "
                               "diverged run or a corrupt file); use an earlier checkpoint")
    assert listing(out) == []


def test_non_finite_check_sees_one_bad_value_in_bf16_and_passes_huge_finite_ones():
    from rwkv_bone.checkpoint import first_non_finite

    big = torch.full((1000, 1000), 3.0e38)  # a float32 sum would overflow; the float64 one does not
    assert first_non_finite({"a": big, "b": big.bfloat16(), "i": torch.arange(5)}) is None
    t = torch.zeros(300, 7, dtype=torch.bfloat16)
    t[299, 6] = float("nan")
    assert first_non_finite({"a": big, "t": t}) == "t"

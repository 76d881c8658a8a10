"""merge.py: our adapter files and the peer project's files folded into plain RWKV-6 checkpoints."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_model
from rwkv_bone.cli import run_cli
from rwkv_bone.model import RWKV6
from rwkv_bone.peft import adapter_modules, apply_peft, mark_trainable, save_adapter

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [1, 5, 17, 99, 3, 250, 42, 7, 0, 64]
IDX = torch.tensor([TOKENS])


def _load_merge_module():
    spec = importlib.util.spec_from_file_location("merge_cli", ROOT / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


merge_cli = _load_merge_module()


def run_merge(*argv: str) -> None:
    merge_cli.main(list(argv))


def run_merge_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """The command as a user runs it: returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["merge.py", *argv])
    with pytest.raises(SystemExit) as e:
        run_cli(merge_cli.main)
    return e.value.code, capsys.readouterr().err


def perturb(model: RWKV6, std: float = 0.03) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            for kind in layer.adapter_names():
                getattr(layer, kind).add_(torch.randn(getattr(layer, kind).shape, generator=g) * std)


def logits_of(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return RWKV6.from_checkpoint(path)(IDX)


@pytest.fixture
def base_path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("base.pth")


def adapted(method: str, **options) -> RWKV6:
    model = random_model()                       # the same weights as the base_path file
    apply_peft(model, method, **options)
    perturb(model)
    return model


@pytest.mark.parametrize("method,options", [
    ("bone", dict(bone_b=32, bone_mode="row")),
    ("bone", dict(bone_b=64, bone_mode="col")),
    ("bone", dict(bone_b=32, bone_mode="ab")),
    ("lora", dict(lora_r=4, lora_alpha=16)),
    ("pissa", dict(pissa_r=8)),
    ("olora", dict(pissa_r=8)),
], ids=["row", "col", "ab", "lora", "pissa", "olora"])
def test_merge_cli_output_equals_adapted_model(tmp_path, base_path, method, options):
    model = adapted(method, **options)
    mark_trainable(model, ["time"])
    with torch.no_grad():
        model.blocks[1].att.time_faaaa.mul_(1.5)
        want = model(IDX)
    save_adapter(model, tmp_path / "adapter.pth")
    run_merge("--base", str(base_path), "--adapter", str(tmp_path / "adapter.pth"),
              "--output", str(tmp_path / "merged.pth"))
    sd = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert not any(k.endswith((".bone", ".lora_A", ".init_lora_A", ".bone_a")) for k in sd)
    assert "__peft__" not in sd
    torch.testing.assert_close(logits_of(tmp_path / "merged.pth"), want, rtol=1e-4, atol=1e-4)


def test_merge_then_load_in_rwkv_package(tmp_path, base_path):
    for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[var] = "0"
    from rwkv.model import RWKV

    model = adapted("bone", bone_b=32)
    with torch.no_grad():
        want = model(IDX)[0]
    save_adapter(model, tmp_path / "adapter.pth")
    run_merge("--base", str(base_path), "--adapter", str(tmp_path / "adapter.pth"),
              "--output", str(tmp_path / "merged.pth"))
    official = RWKV(model=str(tmp_path / "merged.pth"), strategy="cpu fp32", verbose=False)
    got, _ = official.forward(TOKENS, None, full_output=True)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)  # measured 2.6e-6


def test_merge_keeps_the_base_dtype(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("bf16.pth", dtype=torch.bfloat16)
    model = adapted("bone", bone_b=32)
    save_adapter(model, tmp_path / "adapter.pth")
    run_merge("--base", str(base), "--adapter", str(tmp_path / "adapter.pth"), "--output", str(tmp_path / "m.pth"))
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}


def _block(w: torch.Tensor, b: int, a: int, c: int) -> torch.Tensor:
    return w[a * b:(a + 1) * b, c * b:(c + 1) * b]


def test_merge_peer_block_affine_bone_file(tmp_path, base_path):
    # A hand-made RWKV-PEFT "bat" file: only a 3-D .bone tensor, no metadata.
    b = 32
    bone = torch.randn(320 // b, b, b, generator=torch.Generator().manual_seed(0)) * 0.05
    torch.save({"blocks.1.ffn.value.bone": bone}, tmp_path / "peer.pth")
    run_merge("--base", str(base_path), "--adapter", str(tmp_path / "peer.pth"), "--output", str(tmp_path / "m.pth"))
    w = torch.load(base_path, weights_only=True)["blocks.1.ffn.value.weight"]
    got = torch.load(tmp_path / "m.pth", weights_only=True)["blocks.1.ffn.value.weight"]
    for a in range(128 // b):                    # the peer's merge rule, block by block
        for c in range(320 // b):
            want = _block(w, b, a, c) + _block(w, b, a, c) @ bone[c] + bone[c]
            torch.testing.assert_close(_block(got, b, a, c), want, rtol=1e-5, atol=1e-5)


def test_merge_peer_simplified_bone_file(tmp_path, base_path):
    # RWKV-PEFT "bone" (MiSS) mode: bone (b, out), y = W x + (sum of x's b-blocks) @ bone.
    b = 32
    bone = torch.randn(b, 128, generator=torch.Generator().manual_seed(1))
    torch.save({"blocks.0.att.output.bone": bone}, tmp_path / "peer.pth")
    run_merge("--base", str(base_path), "--adapter", str(tmp_path / "peer.pth"), "--output", str(tmp_path / "m.pth"))
    w = torch.load(base_path, weights_only=True)["blocks.0.att.output.weight"]
    got = torch.load(tmp_path / "m.pth", weights_only=True)["blocks.0.att.output.weight"]
    x = torch.randn(5, 128)
    want = x @ w.t() + x.view(5, 128 // b, b).sum(1) @ bone
    torch.testing.assert_close(x @ got.t(), want, rtol=1e-4, atol=1e-4)


def test_merge_peer_lora_file_needs_alpha(tmp_path, base_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g)
    torch.save({"blocks.0.att.key.lora_A": A, "blocks.0.att.key.lora_B": B}, tmp_path / "peer.pth")
    args = ["--base", str(base_path), "--adapter", str(tmp_path / "peer.pth"), "--output", str(tmp_path / "m.pth")]
    code, err = run_merge_cli(monkeypatch, capsys, *args)
    assert code == 2 and "pass --lora_alpha" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pth").exists()
    run_merge(*args, "--lora_alpha", "8")
    w = torch.load(base_path, weights_only=True)["blocks.0.att.key.weight"]
    got = torch.load(tmp_path / "m.pth", weights_only=True)["blocks.0.att.key.weight"]
    torch.testing.assert_close(got, w + 2.0 * B @ A, rtol=1e-5, atol=1e-5)


def test_merge_peer_pissa_file_with_init_file(tmp_path, base_path):
    g = torch.Generator().manual_seed(3)
    A0, B0, A, B = (torch.randn(s, generator=g) * 0.1 for s in [(4, 128), (320, 4), (4, 128), (320, 4)])
    torch.save({"blocks.0.ffn.key.lora_A": A, "blocks.0.ffn.key.lora_B": B}, tmp_path / "peer.pth")
    torch.save({"blocks.0.ffn.key.init_lora_A": A0, "blocks.0.ffn.key.init_lora_B": B0}, tmp_path / "init.pth")
    run_merge("--base", str(base_path), "--adapter", str(tmp_path / "peer.pth"), "--output", str(tmp_path / "m.pth"),
              "--pissa_init", str(tmp_path / "init.pth"))
    w = torch.load(base_path, weights_only=True)["blocks.0.ffn.key.weight"]
    got = torch.load(tmp_path / "m.pth", weights_only=True)["blocks.0.ffn.key.weight"]
    torch.testing.assert_close(got, w - B0 @ A0 + B @ A, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_mismatched_base(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    model = adapted("bone", bone_b=32)
    save_adapter(model, tmp_path / "adapter.pth")
    other = tiny_checkpoint("other.pth", n_embd=192, dim_att=192)
    out = tmp_path / "m.pth"
    code, err = run_merge_cli(monkeypatch, capsys, "--base", str(other), "--adapter",
                              str(tmp_path / "adapter.pth"), "--output", str(out))
    assert code == 2 and err.count("\n") == 1
    assert "blocks.0.att.receptance.bone has shape (4, 32, 32)" in err and "different base model" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_merge_bad_paths_are_one_sentence(tmp_path, base_path, monkeypatch, capsys):
    code, err = run_merge_cli(monkeypatch, capsys, "--base", str(base_path), "--adapter",
                              str(tmp_path / "missing.pth"), "--output", str(tmp_path / "m.pth"))
    assert code == 2 and "missing.pth does not exist" in err and err.count("\n") == 1
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    code, err = run_merge_cli(monkeypatch, capsys, "--base", str(base_path), "--adapter",
                              str(tmp_path / "junk.pth"), "--output", str(tmp_path / "m.pth"))
    assert code == 2 and "is not a readable PyTorch file" in err
    code, err = run_merge_cli(monkeypatch, capsys, "--base", str(tmp_path / "nobase.pth"), "--adapter",
                              str(tmp_path / "junk.pth"), "--output", str(tmp_path / "m.pth"))
    assert code == 2 and err.startswith("error: ")
    code, err = run_merge_cli(monkeypatch, capsys, "--base", str(base_path), "--adapter",
                              str(base_path), "--output", str(tmp_path / "no" / "m.pth"))
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "m.pth").exists()

"""generate.py and rwkv_bone.generate: greedy decoding matches the `rwkv` package, adapters are folded
in exactly, the carried state equals a full forward, sampling stays in the nucleus, text streams
without broken characters, and every user mistake is one `error:` line with exit code 2."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import random_model
from rwkv_bone.cli import run_cli
from rwkv_bone.data.tokenizer import WorldTokenizer
from rwkv_bone.errors import UserError
from rwkv_bone.generate import TextStream, feed, generate, generate_tokens, sample_next, stream_text
from rwkv_bone.loading import load_model
from rwkv_bone.peft import adapter_modules, apply_peft, save_adapter

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 5, 17, 99, 3, 250, 42, 7]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


generate_cli = _load_script("generate")


def run_generate_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """The command as a user runs it, in process: returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as e:
        run_cli(generate_cli.main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def greedy(model, prompt=PROMPT, n: int = 20) -> list[int]:
    return list(generate_tokens(model, prompt, n, temperature=0, stop_ids=()))


@pytest.fixture(scope="module")
def byte_vocab(tmp_path_factory) -> Path:
    """A World-format vocab: the 256 single bytes (id = byte + 1) and two longer tokens."""
    path = tmp_path_factory.mktemp("vocab") / "bytes_vocab.txt"
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    lines += [f"257 {'ab'!r} 2", f"258 {'é'!r} 2"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def base_path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("base.pth")


# ---- decoding against the oracle ------------------------------------------------------------------

def test_greedy_tokens_match_rwkv_package(base_path):
    for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[var] = "0"
    from rwkv.model import RWKV

    official = RWKV(model=str(base_path), strategy="cpu fp32", verbose=False)
    want, tokens, state = [], list(PROMPT), None
    for _ in range(20):
        logits, state = official.forward(tokens, state)
        tokens = [int(torch.argmax(logits))]
        want.append(tokens[0])
    got = greedy(load_model(str(base_path)))
    assert got == want
    assert len(set(got)) > 3                     # a real continuation, not one repeated token


def test_recurrent_state_matches_full_forward():
    model = random_model(seed=3)
    ids = [1, 5, 17, 99, 3, 250, 42, 7, 0, 64, 12, 200, 31]
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]     # (T, V)
        logits, state = feed(model, ids[:5], chunk=2)   # the prompt in awkward pieces
        steps = [logits]
        for t in ids[5:]:
            logits, state = feed(model, [t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps), full[4:], rtol=1e-5, atol=1e-5)


# ---- adapters -------------------------------------------------------------------------------------

def test_adapter_generation_equals_merged_checkpoint(tmp_path, base_path):
    adapted = random_model()                     # the same weights as base_path
    apply_peft(adapted, "bone", bone_b=32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter_modules(adapted).values():
            for kind in layer.adapter_names():
                getattr(layer, kind).add_(torch.randn(getattr(layer, kind).shape, generator=g) * 0.05)
    save_adapter(adapted, tmp_path / "adapter.pth")
    merge_cli = _load_script("merge")
    merge_cli.main(["--base", str(base_path), "--adapter", str(tmp_path / "adapter.pth"),
                    "--output", str(tmp_path / "merged.pth")])

    with_adapter = greedy(load_model(str(base_path), str(tmp_path / "adapter.pth")))
    assert with_adapter == greedy(load_model(str(tmp_path / "merged.pth")))
    assert with_adapter == greedy(adapted)        # the unmerged adapter layers agree too
    assert with_adapter != greedy(load_model(str(base_path)))   # the adapter changes the output


# ---- sampling -------------------------------------------------------------------------------------

def test_sampled_tokens_stay_in_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, 1.0, 0.7, g) for _ in range(2000)]
    assert set(draws) == {1, 3}                   # 0.5 < 0.7 keeps token 3; 0.8 >= 0.7 stops
    assert 0.55 < draws.count(1) / len(draws) < 0.70   # renormalised: 0.5 / 0.8 = 0.625
    draws = [sample_next(logits, 1.0, 0.9, g) for _ in range(2000)]
    assert set(draws) == {1, 3, 2}
    assert set(sample_next(logits, 1.0, 1.0, g) for _ in range(2000)) == {0, 1, 2, 3}
    assert {sample_next(logits, 1.0, 0.4, g) for _ in range(50)} == {1}
    assert sample_next(logits, 0.0, 0.5, g) == 1


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy():
    model = random_model(seed=1)
    run = lambda seed, top_p: list(generate_tokens(model, PROMPT, 15, temperature=1.0,  # noqa: E731
                                                   top_p=top_p, seed=seed, stop_ids=()))
    assert run(7, 1.0) == run(7, 1.0)
    assert run(7, 1.0) != run(8, 1.0)
    assert run(7, 1e-6) == greedy(model, n=15)


# ---- text ----------------------------------------------------------------------------------------

class DecodeOnly:
    """A tokenizer with only `decode` (like tokenizer.json): bytes id - 1, as text."""
    vocab_size = 257

    def decode(self, ids):
        return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind", ["world", "decode_only"])
def test_text_stream_never_splits_a_character(byte_vocab, kind):
    tok = WorldTokenizer(str(byte_vocab)) if kind == "world" else DecodeOnly()
    text = "né 😀 ok"
    stream = TextStream(tok)
    pieces = [stream.push(b + 1) for b in text.encode("utf-8")] + [stream.finish()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1:3] == ["", "é"]               # the first byte of é waits for the second


class ScriptedModel(torch.nn.Module):
    """A stand-in model whose greedy continuation is `script`, then end of document (token 0)."""

    def __init__(self, script: list[int], vocab_size: int = 300):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.emb = torch.nn.Embedding(1, 1)
        self.script = list(script) + [0]

    def forward_with_state(self, idx, state):
        calls = 0 if state is None else state      # the state counts the forward calls
        logits = torch.zeros(1, idx.shape[1], self.config.vocab_size)
        logits[0, -1, self.script[min(calls, len(self.script) - 1)]] = 1.0
        return logits, calls + 1

    def step(self, tokens, state):  # the one-token path, as RWKV6.step: (B,) -> (B, V)
        logits, state = self.forward_with_state(tokens[:, None], state)
        return logits[:, -1], state


def scripted(text: str) -> ScriptedModel:
    return ScriptedModel([b + 1 for b in text.encode("utf-8")])


def test_stop_string_ends_the_text_before_it(byte_vocab):
    tok = WorldTokenizer(str(byte_vocab))
    model = scripted("Sure.\n\nUse it.\n\nUser: next")
    pieces = list(stream_text(model, tok, "Hi", 100, temperature=0, stop=["\n\nUser:"]))
    assert "".join(pieces) == "Sure.\n\nUse it."
    assert all(p for p in pieces)
    assert generate(model, tok, "Hi", 100, temperature=0) == "Sure.\n\nUse it.\n\nUser: next"  # token 0
    assert generate(model, tok, "Hi", 4, temperature=0) == "Sure"


class TopTokenUndecodable(ScriptedModel):
    """Always likes token 299 best (outside a 259-token vocab), then "x", then end of document."""

    def forward_with_state(self, idx, state):
        logits = torch.zeros(1, idx.shape[1], self.config.vocab_size)
        logits[0, -1, 299], logits[0, -1, ord("x") + 1] = 3.0, 2.0
        return logits, (state or 0) + 1


def test_tokens_the_tokenizer_cannot_decode_are_never_drawn(byte_vocab):
    tok = WorldTokenizer(str(byte_vocab))          # ids 0..258
    assert generate(TopTokenUndecodable([]), tok, "Hi", 3, temperature=0) == "xxx"


def test_prompt_outside_the_model_vocab_is_refused(byte_vocab):
    tok = WorldTokenizer(str(byte_vocab))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        generate(ScriptedModel([], vocab_size=100), tok, "zz", 3)


# ---- the command ---------------------------------------------------------------------------------

def test_cli_end_to_end_prints_text(tmp_path):
    path = tmp_path / "world.pth"
    random_model(n_embd=64, dim_att=64, dim_ffn=128, vocab_size=65536).save_checkpoint(path)
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(path), "--prompt",
                        "User: hello\\n\\nAssistant:", "--max_tokens", "12", "--seed", "0",
                        "--device", "cpu"],
                       capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""


def test_cli_greedy_output_equals_library(tmp_path, base_path, byte_vocab, monkeypatch, capsys):
    code, out, err = run_generate_cli(monkeypatch, capsys, "--model", str(base_path), "--prompt",
                                      "ab\\ncd", "--greedy", "--max_tokens", "15",
                                      "--tokenizer", str(byte_vocab), "--device", "cpu")
    assert code == 0 and err == ""
    want = generate(load_model(str(base_path)), WorldTokenizer(str(byte_vocab)), "ab\ncd", 15,
                    temperature=0)
    assert out == want + "\n" and want


def _rwkv7_file(path: Path) -> Path:
    torch.save({"emb.weight": torch.zeros(300, 64), "blocks.0.att.w0": torch.zeros(1, 1, 64)}, path)
    return path


def _mismatched_adapter(path: Path) -> Path:
    model = random_model(n_embd=192, dim_att=192)
    apply_peft(model, "bone", bone_b=32)
    save_adapter(model, path)
    return path


@pytest.mark.parametrize("args,message", [
    pytest.param(lambda p: ["--model", str(p / "nope.pth")], "does not exist", id="missing-model"),
    pytest.param(lambda p: ["--model", str(_rwkv7_file(p / "v7.pth"))], "RWKV-7", id="not-rwkv6"),
    pytest.param(lambda p: ["--adapter", str(_mismatched_adapter(p / "a.pth"))],
                 "different base model", id="adapter-mismatch"),
    pytest.param(lambda p: ["--prompt", ""], "the prompt is empty", id="empty-prompt"),
    pytest.param(lambda p: ["--prompt_file", str(p / "empty.txt")], "the prompt is empty",
                 id="empty-prompt-file"),
    pytest.param(lambda p: ["--top_p", "0"], "outside (0, 1]", id="top_p-0"),
    pytest.param(lambda p: ["--top_p", "1.5"], "outside (0, 1]", id="top_p-above-1"),
    pytest.param(lambda p: ["--temperature", "-0.5"], "is negative", id="negative-temperature"),
])
def test_cli_user_errors_are_one_line(tmp_path, base_path, monkeypatch, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    argv = {"--model": str(base_path), "--prompt": "hello"}
    extra = args(tmp_path)
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value
    if "--prompt_file" in argv:
        del argv["--prompt"]
    code, out, err = run_generate_cli(monkeypatch, capsys, *[x for kv in argv.items() for x in kv],
                                      "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model",
                        str(_rwkv7_file(tmp_path / "v7.pth")), "--prompt", "hi", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr

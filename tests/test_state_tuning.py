"""State tuning (--peft state): the learned initial WKV state, its gradient, its files, and the
official `rwkv` package running a merged state file."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import rwkv_bone.model as model_mod
from conftest import TINY, random_model
from rwkv_bone.errors import UserError
from rwkv_bone.loading import load_model
from rwkv_bone.model import RWKV6
from rwkv_bone.peft import apply_peft, load_adapter, merge_peft, read_adapter_file, save_adapter
from rwkv_bone.wkv.reference import wkv6_reference

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [1, 5, 17, 99, 3, 250, 42, 7, 0, 64]
IDX = torch.tensor([TOKENS])


def state_model(seed: int = 0, std: float = 0.3, **overrides) -> RWKV6:
    """A random tiny model with a non-zero learned initial state (so nothing passes trivially)."""
    model = random_model(seed, **overrides)
    apply_peft(model, "state")
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for b in model.blocks:
            b.att.time_state.copy_(torch.randn(b.att.time_state.shape, generator=g) * std)
    return model


def merge_cli(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("merge_cli", ROOT / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(list(argv))


def test_state_method_trains_only_one_state_per_layer():
    model = state_model()
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    H, N = TINY["n_embd"] // TINY["head_size"], TINY["head_size"]
    assert trainable == {f"blocks.{i}.att.time_state": (H, N, N) for i in range(TINY["n_layer"])}
    fresh = random_model()
    apply_peft(fresh, "state")                   # zero state: the base model exactly
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), random_model()(IDX), rtol=0, atol=0)


def test_model_starts_from_the_state_when_none_is_passed_and_zero_state_returns_it():
    model = state_model()
    idx = torch.tensor([TOKENS, TOKENS[::-1]])
    with torch.no_grad():
        a = model(idx)
        b, _ = model.forward_with_state(idx, model.zero_state(2))
        zeros = [(x, torch.zeros_like(s), f) for x, s, f in model.zero_state(2)]
        c, _ = model.forward_with_state(idx, zeros)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3             # the state changes the output
    s0 = model.zero_state(1)[0][1][0]             # (H, N, N), rows = key channel
    torch.testing.assert_close(s0, model.blocks[0].att.time_state.transpose(1, 2))


def test_time_state_gradient_matches_float64_reference_recurrence(monkeypatch):
    """dL/dtime_state through the model's WKV path against the per-token float64 recurrence,
    where S_0 is the transposed parameter, written out explicitly."""
    model = state_model(seed=2, n_layer=1).double()
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))

    def grad_of():
        model.zero_grad()
        model(idx).logsumexp(-1).mean().backward()
        return model.blocks[0].att.time_state.grad.clone()

    fast = grad_of()

    def reference_with_explicit_state(r, k, v, w, u, state=None):
        B, H, N = r.shape[0], r.shape[2], r.shape[3]
        ts = model.blocks[0].att.time_state          # (H, value, key): S_0[h, i, j] = ts[h, j, i]
        s0 = torch.stack([torch.stack([ts[h].t() for h in range(H)]) for _ in range(B)])
        assert state is not None and torch.equal(state, s0.detach())
        return wkv6_reference(r, k, v, w, u, s0)

    monkeypatch.setattr(model_mod, "wkv6", reference_with_explicit_state)
    ref = grad_of()
    assert fast.abs().max() > 1e-6
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-10)


def test_save_load_roundtrip_and_file_layout(tmp_path):
    model = state_model()
    save_adapter(model, tmp_path / "state.pth")
    raw = torch.load(tmp_path / "state.pth", weights_only=True)
    assert {k for k in raw if k != "__peft__"} == {f"blocks.{i}.att.time_state" for i in range(2)}
    fresh = random_model()
    loaded = load_adapter(fresh, tmp_path / "state.pth")
    assert loaded == sorted(f"blocks.{i}.att.time_state" for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), model(IDX), rtol=0, atol=0)
    af = read_adapter_file(tmp_path / "state.pth")
    assert af.meta["method"] == "state" and len(af.states) == 2 and not af.layers


def test_official_package_runs_merged_state_file_with_our_logits(tmp_path, tiny_checkpoint):
    for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[var] = "0"
    from rwkv.model import RWKV

    base = tiny_checkpoint("base.pth")
    model = RWKV6.from_checkpoint(base)
    with torch.no_grad():
        plain = model(IDX)[0]  # ours, no state
    apply_peft(model, "state")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for b in model.blocks:
            b.att.time_state.copy_(torch.randn(b.att.time_state.shape, generator=g) * 0.3)
        want = model(IDX)[0]
    save_adapter(model, tmp_path / "state.pth")
    merge_cli("--base", str(base), "--adapter", str(tmp_path / "state.pth"), "--output", str(tmp_path / "m.pth"))
    official = RWKV(model=str(tmp_path / "m.pth"), strategy="cpu fp32", verbose=False)
    got, _ = official.forward(TOKENS, None, full_output=True)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)  # measured 2.3e-6
    # The package without the state: our plain logits, and clearly not the stated ones.
    without, _ = RWKV(model=str(base), strategy="cpu fp32", verbose=False).forward(TOKENS, None, full_output=True)
    torch.testing.assert_close(without.float(), plain, rtol=1e-5, atol=1e-5)
    assert (got.float() - without.float()).abs().max() > 0.1, "the state file did not change the package's logits"
    # ... and our loader reads the merged file back with the same state.
    with torch.no_grad():
        torch.testing.assert_close(RWKV6.from_checkpoint(tmp_path / "m.pth")(IDX)[0], want, rtol=1e-5, atol=1e-5)


def test_load_model_combines_a_bone_adapter_and_a_state_adapter(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("base.pth")
    bone = RWKV6.from_checkpoint(base)
    apply_peft(bone, "bone", bone_b=32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(6)
        for n, p in bone.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    save_adapter(bone, tmp_path / "bone.pth")
    state = RWKV6.from_checkpoint(base)
    apply_peft(state, "state")
    with torch.no_grad():
        for b in state.blocks:
            b.att.time_state.normal_(0, 0.3, generator=g)
    save_adapter(state, tmp_path / "state.pth")
    both = load_model(str(base), [str(tmp_path / "bone.pth"), str(tmp_path / "state.pth")])
    merge_peft(bone)                             # the expected model: Bone merged + the states
    bone.add_time_state({k: v for k, v in state.state_dict().items() if k.endswith("time_state")})
    with torch.no_grad():
        torch.testing.assert_close(both(IDX), bone(IDX), rtol=1e-5, atol=1e-5)


def test_state_files_of_another_model_are_refused(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("base.pth")
    torch.save({"blocks.0.att.time_state": torch.zeros(3, 64, 64),
                "blocks.1.att.time_state": torch.zeros(3, 64, 64)}, tmp_path / "s.pth")
    with pytest.raises(UserError, match="has shape \\(3, 64, 64\\)"):
        load_model(str(base), str(tmp_path / "s.pth"))
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, tmp_path / "half.pth")
    with pytest.raises(UserError, match="blocks.1.att.time_state"):
        load_model(str(base), str(tmp_path / "half.pth"))

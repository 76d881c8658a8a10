"""RWKV-6 model: parity with the official `rwkv` package, layout, state carrying, checkpointing."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import rwkv_bone.model as model_mod
from rwkv_bone.config import RWKV6Config
from rwkv_bone.errors import UserError
from rwkv_bone.model import RWKV6
from rwkv_bone.wkv.reference import wkv6_reference

from conftest import TINY, random_model


def _oracle(ckpt_path, tokens: list[int], strategy: str = "cpu fp32") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits for every position and the final state from the official `rwkv` package (CPU path)."""
    for name in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[name] = "0"
    from rwkv.model import RWKV  # reads the variables above at import time

    ref = RWKV(model=str(ckpt_path)[: -len(".pth")], strategy=strategy, verbose=False)
    out, state = ref.forward(tokens, None, full_output=True)
    return out.reshape(len(tokens), -1).float(), state


PARITY_CONFIGS = {
    "C128_H2_Dm16_Dd24_F320": {},
    "L3_C64_N32_Dm8_Dd40_F96_V97": dict(n_layer=3, n_embd=64, head_size=32, vocab_size=97, dim_ffn=96, dim_maa=8, dim_decay=40),
}


@pytest.mark.parametrize("overrides", PARITY_CONFIGS.values(), ids=PARITY_CONFIGS.keys())
def test_logits_match_rwkv_package(tiny_checkpoint, overrides):
    path = tiny_checkpoint(seed=3, **overrides)
    model = RWKV6.from_checkpoint(path)
    V = model.config.vocab_size
    tokens = torch.randint(0, V, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours, our_state = model.forward_with_state(torch.tensor([tokens]))
    ours = ours[0]  # (T, V)
    theirs, their_state = _oracle(path, tokens)
    assert ours.shape == theirs.shape == (37, V)
    assert theirs.std() > 0.1 and theirs.std(dim=0).min() > 1e-3  # logits really vary
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-5, f"relative difference {rel:.2e}"  # measured 4.6e-7 (fp32 rounding only)
    # The carried state has the package's meaning: (att x, wkv (H, N_key, N_value), ffn x) per layer.
    assert len(their_state) == 3 * model.config.n_layer
    for i, layer in enumerate(our_state):
        for ours_t, theirs_t in zip(layer, their_state[3 * i : 3 * i + 3]):
            # measured: at most 1.1e-5 off on values near 20, 7.6e-6 on small ones
            torch.testing.assert_close(ours_t[0], theirs_t.float(), rtol=1e-5, atol=2e-5)
    # A one-token call goes through the package's recurrent path: must match our first position.
    one, _ = _oracle(path, tokens[:1])
    torch.testing.assert_close(ours[0], one[0], rtol=1e-5, atol=1e-5)  # measured 8.3e-7


def test_bf16_checkpoint_matches_rwkv_package_bf16(tiny_checkpoint):
    """Released checkpoints are bf16: loaded as bf16 here and with the package's "cpu bf16" strategy
    (which also runs WKV and GroupNorm in float32) the logits agree."""
    path = tiny_checkpoint(seed=11, dtype=torch.bfloat16)
    model = RWKV6.from_checkpoint(path, dtype=None)
    assert model.emb.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, TINY["vocab_size"], (21,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0]
    theirs, _ = _oracle(path, tokens, strategy="cpu bf16")
    assert theirs.std() > 0.1
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-3, f"relative difference {rel:.2e}"


def test_state_dict_is_official_layout_in_reference_order(tiny_config):
    model = RWKV6.from_config(tiny_config, device="meta")
    sd = model.state_dict()
    expected = tiny_config.expected_shapes()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("overrides", [{}, dict(dim_att=192, n_layer=1)], ids=["A=C", "A!=C"])
def test_processing_in_pieces_equals_processing_whole(overrides):
    model = random_model(seed=1, **overrides).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, state_whole = model.forward_with_state(idx)
        pieces, state = [], None
        for a, b in ((0, 10), (10, 11), (11, 37)):
            out, state = model.forward_with_state(idx[:, a:b], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    for s_piece, s_whole in zip(state, state_whole):
        for a, b in zip(s_piece, s_whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert state[0][1].shape == (2, model.config.n_head, 64, 64)


def test_zero_state_equals_no_state():
    model = random_model(seed=4).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        a, _ = model.forward_with_state(idx, None)
        b, _ = model.forward_with_state(idx, model.zero_state(2))
    torch.testing.assert_close(a, b)


def test_float64_forward_and_grads_match_explicit_recurrence(monkeypatch):
    """The model's WKV call (whatever wkv6 dispatches to) against the reference recurrence."""
    model = random_model(seed=5, n_layer=1).double()
    idx = torch.randint(0, TINY["vocab_size"], (1, 19))

    def run():
        model.zero_grad()
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_fast, grads_fast = run()
    monkeypatch.setattr(model_mod, "wkv6", wkv6_reference)
    loss_ref, grads_ref = run()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_wkv6_is_looked_up_at_call_time(monkeypatch):
    calls = []

    def spy(r, k, v, w, u, state=None):
        calls.append((r.shape, r.dtype, u.shape))
        return wkv6_reference(r, k, v, w, u, state)

    monkeypatch.setattr(model_mod, "wkv6", spy)
    model = random_model(seed=0).bfloat16()
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long))
    assert calls == [((1, 5, 2, 64), torch.float32, (2, 64))] * 2  # bf16 model: WKV in float32


def test_grad_cp_gives_same_loss_and_grads():
    model = random_model(seed=6).train()
    idx = torch.randint(0, TINY["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, TINY["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(1))
    results = []
    for cp in (False, True):
        model.grad_cp = cp
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for n, g in g0.items() if n.endswith("time_maa_w1"))


def test_bf16_forward_is_close_to_fp32():
    model = random_model(seed=7)
    idx = torch.randint(0, TINY["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(idx)
        out = model.bfloat16()(idx)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative difference {rel:.3f}"


def test_from_checkpoint_infers_every_dimension(tiny_checkpoint):
    overrides = dict(n_layer=3, n_embd=64, vocab_size=77, dim_att=128, dim_ffn=96, head_size=32, dim_maa=8, dim_decay=40)
    model = RWKV6.from_checkpoint(tiny_checkpoint(**overrides))
    assert model.config == RWKV6Config(**overrides)
    assert model.config.n_head == 4


def test_from_checkpoint_casts_to_requested_dtype(tiny_checkpoint):
    path = tiny_checkpoint(dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in RWKV6.from_checkpoint(path).parameters())
    kept = RWKV6.from_checkpoint(path, dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())
    assert all(p.requires_grad for p in kept.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_bit_identical(tmp_path, dtype):
    model = random_model(seed=8, dtype=dtype)
    path = tmp_path / "m.pth"
    model.save_checkpoint(path)
    again = RWKV6.from_checkpoint(path, dtype=None)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    raw = torch.load(path, weights_only=True)
    assert all(t.is_contiguous() for t in raw.values())
    assert [p for p in os.listdir(tmp_path)] == ["m.pth"]  # no temporary left behind


def test_save_checkpoint_casts_and_overwrites_atomically(tmp_path):
    path = tmp_path / "m.pth"
    random_model(seed=0).save_checkpoint(path)
    random_model(seed=1).save_checkpoint(path, dtype=torch.bfloat16)
    raw = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in raw.values())
    assert os.listdir(tmp_path) == ["m.pth"]


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    path.write_bytes(b"old")

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        random_model(seed=0).save_checkpoint(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pth"]


def test_save_refuses_adapter_keys_and_meta_models(tmp_path):
    model = random_model(seed=0)
    model.blocks[0].att.key.register_parameter("bone", nn.Parameter(torch.zeros(2, 2)))
    with pytest.raises(UserError, match=r"outside the RWKV-6 layout \(e.g. blocks.0.att.key.bone\); merge"):
        model.save_checkpoint(tmp_path / "m.pth")
    with pytest.raises(UserError, match="meta device"):
        RWKV6.from_config(RWKV6Config(**TINY), device="meta").save_checkpoint(tmp_path / "m.pth")
    with pytest.raises(UserError, match="does not exist"):
        random_model(seed=0).save_checkpoint(tmp_path / "no" / "m.pth")


def _count_1_6b() -> int:
    """Parameter count of RWKV-6 1.6B written out from the layout table."""
    L, C, A, F, V, H, N, Dm, Dd = 24, 2048, 2048, 7168, 65536, 32, 64, 32, 64
    ln = 2 * C
    att = 6 * C + C * 5 * Dm + 5 * Dm * C + A + C * Dd + Dd * A + H * N + 4 * A * C + C * A + 2 * A
    ffn = 2 * C + F * C + C * C + C * F
    return V * C + ln + L * (2 * ln + att + ffn) + ln + V * C


def test_meta_preset_allocates_nothing_and_counts_1_6b():
    model = RWKV6.from_preset("1.6b")
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == _count_1_6b() == model.config.n_params() == 1_599_873_024
    assert RWKV6.from_preset("7b").config.dim_maa == 64
    assert RWKV6.from_preset("14b").config.n_layer == 61
    small = RWKV6.from_preset("3b", n_layer=2)
    assert (small.config.n_embd, small.config.dim_ffn, small.config.n_layer) == (2560, 8960, 2)


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="unknown model preset '2b'; choose one of 1.6b, 3b, 7b, 14b"):
        RWKV6.from_preset("2b")


def test_config_refuses_head_size_not_dividing_dim_att():
    with pytest.raises(UserError, match="dim_att 100 is not a multiple of head_size 64"):
        RWKV6Config(n_layer=1, n_embd=100, vocab_size=10)


def test_init_weights_follows_reference_recipe():
    cfg = RWKV6Config(**{**TINY, "n_layer": 3})
    model = RWKV6.from_config(cfg)
    att0, att2 = model.blocks[0].att, model.blocks[2].att
    assert model.emb.weight.abs().max() <= 1e-4
    for b in model.blocks:
        assert not b.att.output.weight.any() and not b.ffn.value.weight.any() and not b.ffn.receptance.weight.any()
        assert not b.att.time_maa_w1.any() and not b.att.time_decay_w1.any()
        assert 0 < b.att.time_maa_w2.abs().max() <= 0.01
    torch.testing.assert_close(att0.ln_x.weight, torch.full((128,), (1 / 3) ** 0.7))
    assert att0.time_decay.flatten()[0] == -6 and abs(att0.time_decay.flatten()[-1] + 1) < 1e-5
    assert (att2.time_decay.flatten().diff() >= 0).all()
    for p in (att2.time_maa_k, att2.time_maa_r, model.blocks[2].ffn.time_maa_k):
        assert p.min() >= 0 and p.max() <= 1
    assert abs(att0.time_faaaa.mean() - 0.5) < 0.05
    w = att0.receptance.weight
    torch.testing.assert_close(w @ w.T, torch.eye(128), atol=1e-4, rtol=0)  # orthogonal, gain 1
    k = att0.key.weight
    torch.testing.assert_close(k @ k.T, 0.01 * torch.eye(128), atol=1e-5, rtol=0)  # gain 0.1
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert torch.isfinite(logits).all()


def test_linear_replaced_by_wrapper_module_is_used():
    model = random_model(seed=9).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        before = model(idx)

    class Doubler(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.weight = base.weight  # same Parameter, so the key stays ...key.weight

        def forward(self, x):
            return nn.functional.linear(x, self.weight) * 2

    model.blocks[1].ffn.value = Doubler(model.blocks[1].ffn.value)
    assert "blocks.1.ffn.value.weight" in model.state_dict()
    with torch.no_grad():
        after = model(idx)
    assert not torch.allclose(before, after)


def test_forward_refuses_bad_token_shapes():
    model = random_model(seed=0)
    with pytest.raises(UserError, match=r"shape \(batch, time\), got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(UserError, match="empty sequence"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(UserError, match="state holds 1 layers but the model has 2"):
        model.forward_with_state(torch.zeros(1, 3, dtype=torch.long), model.zero_state(1)[:1])


def test_autocast_bf16_with_frozen_bf16_base_trains_fp32_time_params():
    """The trainer's bf16 mode: frozen weights stored in bf16, trained ones in fp32, under autocast."""
    reference = random_model(seed=10)
    model = random_model(seed=10).train()
    for name, p in model.named_parameters():
        if ".time_" not in name:
            p.data = p.data.bfloat16()
            p.requires_grad_(False)
    idx = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(5))
    grads = []
    for cp in (False, True):
        model.grad_cp = cp
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
        assert logits.dtype == torch.float32
        logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        rel = (logits - reference(idx)).norm() / reference(idx).norm()
    assert rel < 0.05


@pytest.mark.parametrize("shape", [(96, 96), (40, 96), (96, 40)])
def test_orthogonal_init_is_orthogonal_with_gain(shape):
    from rwkv_bone.init import orthogonal_

    torch.manual_seed(0)
    w = orthogonal_(torch.empty(shape), gain=0.5)
    small = min(shape)
    gram = w @ w.T if shape[0] <= shape[1] else w.T @ w  # (small, small)
    torch.testing.assert_close(gram, 0.25 * torch.eye(small), atol=1e-6, rtol=0)
    assert not torch.equal(orthogonal_(torch.empty(shape)), orthogonal_(torch.empty(shape)))


GPU_BF16_GRAD_TOL = 0.1  # per-parameter |g_gpu - g_cpu| / |g_cpu|; bf16 weights and activations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step_matches_cpu_fp32():
    cpu = random_model(seed=12, n_layer=2)
    gpu = random_model(seed=12, n_layer=2).cuda().bfloat16().train()
    gpu.grad_cp = True
    idx = torch.randint(0, TINY["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = cpu(idx)
    logits = gpu(idx.cuda())
    rel = (logits.cpu() - ref).norm() / ref.norm()
    assert rel < 0.05, f"relative difference {rel:.3f}"
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())
    # The GPU backward against the CPU fp32 reference gradients, parameter by parameter.
    cpu.train()
    cpu(idx).logsumexp(-1).mean().backward()
    ref_grads = dict(cpu.named_parameters())
    errs = {}
    for n, p in gpu.named_parameters():
        want = ref_grads[n].grad
        errs[n] = ((p.grad.float().cpu() - want).norm() / want.norm().clamp(min=1e-12)).item()
    worst = max(errs, key=errs.get)
    print("worst GPU bf16 gradient relative error:", worst, f"{errs[worst]:.3e}")
    assert errs[worst] < GPU_BF16_GRAD_TOL, (worst, errs[worst])
    with torch.no_grad():
        gpu.eval()
        whole, _ = gpu.forward_with_state(idx.cuda())
        a, state = gpu.forward_with_state(idx[:, :37].cuda())
        b, _ = gpu.forward_with_state(idx[:, 37:].cuda(), state)
    pieces = torch.cat([a, b], 1)
    assert (pieces - whole).norm() / whole.norm() < 1e-2  # bf16 rounding may differ, nothing more

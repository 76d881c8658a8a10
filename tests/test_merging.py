"""rwkv_bone.merging (streamed merge) and the zero-copy / shapes-only checkpoint readers: the streamed
merge gives the bits of the in-memory merge_state_dict for every method and for several adapters,
.safetensors round trips, and a dry run counts what a full load counts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import random_model
from rwkv_bone.checkpoint import load_state_dict, read_config, read_shapes
from rwkv_bone.errors import UserError
from rwkv_bone.merging import merge_checkpoint
from rwkv_bone.peft import adapter_modules, apply_peft, mark_trainable, save_adapter
from rwkv_bone.peft.adapter_io import merge_state_dict, read_adapter_file

TOKENS = [1, 5, 17, 99, 3, 250, 42, 7, 0, 64]

METHODS = {
    "bone-row": ("bone", dict(bone_b=32, bone_mode="row")),
    "bone-col": ("bone", dict(bone_b=64, bone_mode="col")),
    "bone-ab": ("bone", dict(bone_b=32, bone_mode="ab")),
    "lora": ("lora", dict(lora_r=4, lora_alpha=16)),
    "pissa": ("pissa", dict(pissa_r=8)),
    "miss": ("miss", dict(miss_r=16)),
    "miss-mini": ("miss", dict(miss_r=16, miss_mode="mini", miss_mini_r=32)),
    "state": ("state", {}),
}


def write_adapter(path: Path, method: str, seed: int = 5, parts: tuple[str, ...] = (), **options) -> Path:
    """An adapter trained away from its initial values (a merge from zero would pass trivially)."""
    model = random_model()
    apply_peft(model, method, **options)
    mark_trainable(model, list(parts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            for kind in layer.adapter_names():
                t = getattr(layer, kind)
                t.add_(torch.randn(t.shape, generator=g) * 0.03)
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("time_state") or name.endswith("time_faaaa")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, path)
    return path


def old_merge(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    sd = load_state_dict(base)
    for a in adapters:
        sd = merge_state_dict(sd, read_adapter_file(a))
    return sd


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), want[k].contiguous().view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(METHODS))
def test_streamed_merge_equals_the_in_memory_merge_bit_for_bit(tmp_path, tiny_checkpoint, kind, dtype):
    base = tiny_checkpoint("base.pth", dtype=dtype)
    method, options = METHODS[kind]
    adapter = write_adapter(tmp_path / "a.pth", method, parts=("time",) if method != "state" else (), **options)
    merge_checkpoint(base, [adapter], tmp_path / "m.pth")
    assert_bitwise_equal(torch.load(tmp_path / "m.pth", weights_only=True), old_merge(base, [adapter]))


@pytest.mark.parametrize("skip_data", [True, False], ids=["skip_data", "scratch"])
def test_several_adapters_fold_in_order_like_the_in_memory_merge(tmp_path, tiny_checkpoint, monkeypatch, skip_data):
    if not skip_data:   # the fallback .pth writer of a torch without serialization.skip_data
        monkeypatch.delattr(torch.serialization, "skip_data")
    base = tiny_checkpoint("base.pth", dtype=torch.bfloat16)
    adapters = [write_adapter(tmp_path / "bone.pth", "bone", seed=1, parts=("time",), bone_b=32),
                write_adapter(tmp_path / "lora.pth", "lora", seed=2, lora_r=4, lora_alpha=8),
                write_adapter(tmp_path / "miss.pth", "miss", seed=3, miss_r=16),
                write_adapter(tmp_path / "state.pth", "state", seed=4)]
    want = old_merge(base, adapters)
    merge_checkpoint(base, adapters, tmp_path / "m.pth")
    assert_bitwise_equal(torch.load(tmp_path / "m.pth", weights_only=True), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pth", "bone.pth", "lora.pth", "m.pth",
                                                          "miss.pth", "state.pth"]   # no scratch left
    merge_checkpoint(base, adapters, tmp_path / "m.safetensors")
    assert_bitwise_equal(load_state_dict(tmp_path / "m.safetensors"), want)


def test_safetensors_output_loads_in_safetensors_and_in_our_loader(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    base = tiny_checkpoint("base.pth", dtype=torch.bfloat16)
    adapter = write_adapter(tmp_path / "a.pth", "bone", bone_b=32)
    merge_checkpoint(base, [adapter], tmp_path / "m.safetensors")
    merge_checkpoint(base, [adapter], tmp_path / "m.pth")
    want = torch.load(tmp_path / "m.pth", weights_only=True)
    theirs = load_file(str(tmp_path / "m.safetensors"))
    assert set(theirs) == set(want) and all(torch.equal(theirs[k], want[k]) for k in want)
    assert_bitwise_equal(load_state_dict(tmp_path / "m.safetensors"), want)
    # and a .safetensors base merges like the .pth it came from
    merge_checkpoint(tmp_path / "m.safetensors", [adapter], tmp_path / "mm.pth")
    assert_bitwise_equal(torch.load(tmp_path / "mm.pth", weights_only=True), old_merge(tmp_path / "m.pth", [adapter]))


def test_a_safetensors_base_loads_equal_to_the_pth_base(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    base = tiny_checkpoint("base.pth", dtype=torch.bfloat16)
    sd = torch.load(base, weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "base.safetensors"))
    got = load_state_dict(tmp_path / "base.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert read_shapes(tmp_path / "base.safetensors") == read_shapes(base) == {k: tuple(v.shape) for k, v in sd.items()}


def test_read_shapes_validates_without_reading_weights(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("base.pth")
    sd = torch.load(base, weights_only=True)
    sd["blocks.1.att.value.weight"][0, 0] = float("nan")      # values are not read...
    torch.save(sd, tmp_path / "nan.pth")
    assert read_config(tmp_path / "nan.pth") == read_config(base)
    del sd["blocks.1.att.key.weight"]                         # ...but the layout is checked
    torch.save(sd, tmp_path / "incomplete.pth")
    with pytest.raises(UserError, match="is missing tensor blocks.1.att.key.weight"):
        read_shapes(tmp_path / "incomplete.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a readable safetensors checkpoint"):
        load_state_dict(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("flags", [["--peft", "none"], ["--peft", "bone", "--bone_b", "16"]], ids=["full", "bone"])
def test_dry_run_count_equals_the_full_load_count(tiny_checkpoint, capsys, flags):
    from rwkv_bone.model import RWKV6
    from rwkv_bone.peft import count_trainable
    from rwkv_bone.train.args import parse_args
    from rwkv_bone.train.run import run

    base = tiny_checkpoint("base.pth")
    assert run(parse_args(["--load_model", str(base), *flags, "--dry_run"])) == 0
    model = RWKV6.from_checkpoint(base)
    if flags[1] == "none":
        want = sum(p.numel() for p in model.parameters())
    else:
        want = count_trainable(model.config, "bone", bone_b=16)
    assert f"trainable parameters: {want:,}" in capsys.readouterr().out


def test_streamed_pth_loads_in_the_rwkv_package(tmp_path, tiny_checkpoint):
    for var in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON"):
        os.environ[var] = "0"
    from rwkv.model import RWKV

    from rwkv_bone.model import RWKV6

    base = tiny_checkpoint("base.pth")
    merge_checkpoint(base, [write_adapter(tmp_path / "a.pth", "bone", bone_b=32)], tmp_path / "m.pth")
    with torch.no_grad():
        want = RWKV6.from_checkpoint(tmp_path / "m.pth")(torch.tensor([TOKENS]))[0]
    official = RWKV(model=str(tmp_path / "m.pth"), strategy="cpu fp32", verbose=False)
    got, _ = official.forward(TOKENS, None, full_output=True)
    torch.testing.assert_close(got.float(), want, rtol=2e-4, atol=2e-4)


def test_a_non_finite_merge_writes_nothing(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("base.pth", dtype=torch.bfloat16)
    adapter = write_adapter(tmp_path / "a.pth", "lora", lora_r=4, lora_alpha=16)
    af = read_adapter_file(adapter)
    af.layers["blocks.1.att.key"]["lora_A"].fill_(1e30)
    af.layers["blocks.1.att.key"]["lora_B"].fill_(1e30)
    for out in ("m.pth", "m.safetensors"):
        with pytest.raises(UserError, match="gives NaN or infinite values in blocks.1.att.key.weight"):
            merge_checkpoint(base, [af], tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "base.pth"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["row", "col", "ab"])
def test_chunked_bone_merge_gives_the_bits_of_merged_weight(monkeypatch, mode, dtype):
    import rwkv_bone.merging as merging
    from rwkv_bone.peft.adapter_io import merged_weight

    monkeypatch.setattr(merging, "_CHUNK_ELEMENTS", 3 * 32 * 160)   # 96-row chunks: the last one short
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(160 * 2, 32 * 5, generator=g) * 0.02).to(dtype)   # (320, 160), b = 32
    meta = dict(method="bone", bone_b=32, bone_mode=mode)
    n = (320 if mode == "col" else 160) // 32
    names = ["bone_a", "bone_b"] if mode == "ab" else ["bone"]
    tensors = {k: torch.randn(n, 32, 32, generator=g) * 0.05 for k in names}
    got, want = merging.bone_merged(w, meta, tensors), merged_weight(w, meta, tensors)
    assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))

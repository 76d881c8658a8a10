"""A new method is its options class, its MethodCode and one `register` line: a toy method defined
here, which no file of the package names, gets train.py flags and checks, recorded settings, a
label, a --resume comparison, a --dry_run count, an adapter file that reads back, merges (in memory
and streamed) and loads. Every list a hand-written copy of the table would go stale in shows here."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_model
from rwkv_bone.errors import UserError
from rwkv_bone.merging import merge_checkpoint
from rwkv_bone.model import RWKV6
from rwkv_bone.peft import adapter_modules, apply_peft, count_trainable, load_adapter, merge_peft, save_adapter
from rwkv_bone.peft.adapter_io import merge_state_dict, read_adapter_file
from rwkv_bone.peft.fold import base_weight, fold_into_linear
from rwkv_bone.peft.options import MethodOptions, finite, option
from rwkv_bone.peft.registry import REGISTRY, Method, MethodCode, register
from rwkv_bone.train.args import build_parser, method_label, parse_args, peft_options
from rwkv_bone.train.checkpoints import check_resume_settings, resume_settings
from rwkv_bone.train.plan import dry_run

TOKENS = torch.tensor([[1, 5, 17, 99, 3, 250, 42, 7]])


@dataclass(frozen=True)
class ToyOptions(MethodOptions):
    toy_mode: str = option("out", "toy: scale the output rows or the input columns", choices=("out", "in"))
    toy_init: float = option(0.0, "toy: initial scale offset", checks=(finite,))

    @classmethod
    def label(cls, settings) -> str:
        return f"toy-{settings['toy_mode']}"


def toy_weight(w: torch.Tensor, g: torch.Tensor, mode: str) -> torch.Tensor:
    """W' = diag(1 + g) W (out: g (out,)) or W diag(1 + g) (in: g (in,))."""
    return w * (1 + g)[:, None] if mode == "out" else w * (1 + g)[None, :]


class ToyLinear(nn.Module):
    def __init__(self, base: nn.Linear, mode: str, init: float):
        super().__init__()
        self.in_features, self.out_features, self.mode = base.in_features, base.out_features, mode
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        n = self.out_features if mode == "out" else self.in_features
        self.toy_g = nn.Parameter(torch.full((n,), init, device=self.weight.device, dtype=torch.float32))

    def adapter_names(self) -> list[str]:
        return ["toy_g"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, toy_weight(self.weight, self.toy_g.to(x.dtype), self.mode), self.bias)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        w = base_weight(self).float()
        return toy_weight(w, self.toy_g.float(), self.mode) - w

    def merged_linear(self) -> nn.Linear:
        return fold_into_linear(self)


TOY = MethodCode(
    layer=ToyLinear,
    build=lambda base, s, name, init_factors=None: ToyLinear(base, s["toy_mode"], s["toy_init"]),
    check_layer=lambda name, out, n_in, s: None,
    layer_shapes=lambda s, out, n_in: {"toy_g": (out if s["toy_mode"] == "out" else n_in,)},
    kinds=("toy_g",),
    merged=lambda w, s, t: toy_weight(w, t["toy_g"], s["toy_mode"]),
)


@pytest.fixture
def toy():
    method = register(Method("toy", ToyOptions, f"{__name__}:TOY", supports_quant=False))
    try:
        yield method
    finally:
        del REGISTRY["toy"]


def flags(*extra: str):
    return build_parser().parse_args(["--load_model", "base.pth", "--data_file", "data/pile", *extra])


def test_toy_flags_and_checks_come_from_its_options(toy):
    parser = build_parser()
    adapter = next(g for g in parser._action_groups if g.title == "adapter")
    actions = {a.dest: a for a in adapter._group_actions}
    assert "toy" in actions["peft"].choices
    assert actions["toy_mode"].choices == ("out", "in") and actions["toy_mode"].default == "out"
    assert actions["toy_init"].type is float and actions["toy_init"].help == "toy: initial scale offset"
    with pytest.raises(UserError, match="--toy_init nan is not a finite number"):
        parse_args(["--model_preset", "3b", "--dry_run", "--peft", "toy", "--toy_init", "nan"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--toy_mode", "diag"])


def test_toy_settings_label_and_resume_comparison(toy):
    args = flags("--peft", "toy", "--toy_mode", "in")
    assert peft_options(args) == {"toy_mode": "in", "toy_init": 0.0}
    assert method_label(args) == "toy-in"
    saved = resume_settings(args)
    assert saved["toy_mode"] == "in"
    check_resume_settings(saved, flags("--peft", "toy", "--toy_mode", "in"))
    with pytest.raises(UserError, match="resume with the same --toy_mode "):
        check_resume_settings(saved, flags("--peft", "toy"))
    with pytest.raises(UserError, match="resume with the same --toy_init "):
        check_resume_settings(saved, flags("--peft", "toy", "--toy_mode", "in", "--toy_init", "0.5"))


def test_toy_dry_run_counts_its_tensors(toy, tiny_config, capsys):
    # toy_mode in: one (in,) vector per target: 5 att linears and ffn key/receptance read C, ffn value F
    want = tiny_config.n_layer * (7 * tiny_config.n_embd + tiny_config.dim_ffn)
    assert count_trainable(tiny_config, "toy", toy_mode="in") == want
    assert dry_run(parse_args(["--model_preset", "1.6b", "--dry_run", "--peft", "toy"])) == 0
    out = capsys.readouterr().out
    assert "method: toy-out" in out
    assert f"trainable parameters: {count_trainable('1.6b', 'toy'):,}" in out


@pytest.mark.parametrize("mode", ["out", "in"])
def test_toy_adapter_saves_reads_merges_and_loads(toy, tmp_path, mode):
    base = random_model()
    base.save_checkpoint(tmp_path / "base.pth")
    model = random_model()
    apply_peft(model, "toy", toy_mode=mode)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                          # away from the initial values: no trivial merge
        for layer in adapter_modules(model).values():
            layer.toy_g.add_(torch.randn(layer.toy_g.shape, generator=g) * 0.1)
        want = model(TOKENS)
    save_adapter(model, tmp_path / "toy.pth")

    af = read_adapter_file(tmp_path / "toy.pth")
    assert af.meta["method"] == "toy" and af.meta["toy_mode"] == mode and not af.others
    assert {k for t in af.layers.values() for k in t} == {"toy_g"}
    merged = RWKV6.from_state_dict(merge_state_dict(base.state_dict(), af))
    merge_checkpoint(tmp_path / "base.pth", [tmp_path / "toy.pth"], tmp_path / "merged.pth")
    streamed = RWKV6.from_checkpoint(tmp_path / "merged.pth")
    loaded = random_model()
    assert load_adapter(loaded, tmp_path / "toy.pth")
    with torch.no_grad():
        for m in (merged, streamed, loaded):
            torch.testing.assert_close(m(TOKENS), want, rtol=1e-4, atol=1e-4)
        merge_peft(model)
        torch.testing.assert_close(model(TOKENS), want, rtol=1e-4, atol=1e-4)
    fresh = random_model()
    apply_peft(fresh, "toy", toy_mode="in" if mode == "out" else "out")
    with pytest.raises(UserError, match="toy_mode"):   # an adapted model must agree with the file
        load_adapter(fresh, tmp_path / "toy.pth")


def test_a_method_without_its_own_label_is_named_by_its_options():
    import dataclasses

    from rwkv_bone.peft.options import MethodOptions, option

    @dataclasses.dataclass(frozen=True)
    class Plain(MethodOptions):
        plain_r: int = option(4, "rank")
        plain_mode: str = option("a", "mode", choices=("a", "b"))

    assert Plain.label({"plain_r": 8, "plain_mode": "b"}) == "plain_r=8 plain_mode=b"

"""train.py's method flags read through the registry: settings, labels, --peft choices."""
from __future__ import annotations

import pytest

from rwkv_bone.peft.registry import METHODS, REGISTRY, method_settings
from rwkv_bone.train.args import PEFT_METHODS, build_parser, method_label, peft_options


def flags(*extra: str):
    return build_parser().parse_args(["--load_model", "base.pth", *extra])


@pytest.mark.parametrize("argv, settings, label", [
    (["--peft", "bone"], {"bone_b": 64, "bone_mode": "row"}, "bone-row b=64"),
    (["--peft", "lora", "--lora_alpha", "16"],
     {"lora_r": 32, "lora_alpha": 16.0, "lora_dropout": 0.0, "svd_niter": 4}, "lora r=32"),
    (["--peft", "pissa", "--lora_r", "8"],              # pissa_r defaults to lora_r; scale 1
     {"lora_r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0, "svd_niter": 4}, "pissa r=8"),
    (["--peft", "pissa", "--pissa_r", "4", "--svd_niter", "2"],
     {"lora_r": 4, "lora_alpha": 4.0, "lora_dropout": 0.0, "svd_niter": 2}, "pissa r=4"),
    (["--peft", "miss", "--miss_mode", "mini", "--miss_mini_r", "8"],
     {"miss_r": 64, "miss_mode": "mini", "miss_mini_r": 8}, "miss r=64 mini_r=8"),
    (["--peft", "state"], {}, "state"),
    (["--peft", "none"], {}, "full"),
])
def test_peft_options_are_the_registry_settings_of_the_flags(argv, settings, label):
    args = flags(*argv)
    assert peft_options(args) == settings
    assert method_label(args) == label
    if args.peft != "none":                           # apply_peft(**peft_options) records the same settings
        assert method_settings(args.peft, peft_options(args)) == settings


def test_peft_choices_are_none_and_the_registry_methods():
    assert PEFT_METHODS == ("none", *METHODS)
    assert {n for n, m in REGISTRY.items() if m.supports_quant} == {"bone", "lora", "pissa", "olora"}
    folder = {n for n, m in REGISTRY.items() if m.peft_folder(method_settings(n, {}))}
    assert folder == {"lora", "miss"}                 # bone only with --bone_mode col
    assert REGISTRY["bone"].peft_folder(method_settings("bone", {"bone_mode": "col"}))

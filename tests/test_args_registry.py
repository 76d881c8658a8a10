"""train.py's method flags read through the registry: settings, labels, --peft choices."""
from __future__ import annotations

import pytest

from rwkv_bone.errors import UserError
from rwkv_bone.peft.registry import METHODS, REGISTRY, method_settings, option_fields
from rwkv_bone.train.args import build_parser, method_label, parse_args, peft_methods, peft_options


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
    assert peft_methods() == ("none", *METHODS) == ("none", *REGISTRY)
    assert {n for n, m in REGISTRY.items() if m.supports_quant} == {"bone", "lora", "pissa", "olora"}
    folder = {n for n, m in REGISTRY.items() if m.peft_folder(method_settings(n, {}))}
    assert folder == {"lora", "miss"}                 # bone only with --bone_mode col
    assert REGISTRY["bone"].peft_folder(method_settings("bone", {"bone_mode": "col"}))


def test_every_adapter_flag_is_a_registry_option_with_its_default_and_help():
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == "adapter")
    flags = {a.dest: a for a in group._group_actions}
    fields = option_fields()
    assert set(fields) <= set(flags)
    assert set(flags) - set(fields) == {"peft", "adapter_format", "quant", "train_parts"}
    for name, (field, kind) in fields.items():
        action = flags[name]
        assert (action.default, action.help, action.type) == (field.default, field.metadata["help"], kind)
        assert action.choices == field.metadata["choices"]


@pytest.mark.parametrize("argv, message", [
    (["--bone_b", "0"], "--bone_b must be a positive integer, got 0"),
    (["--peft", "lora", "--pissa_r", "0"], "--pissa_r must be a positive integer, got 0"),
    (["--lora_dropout", "1"], "--lora_dropout must lie in [0, 1)"),
    (["--lora_alpha", "nan"], "--lora_alpha nan is not a finite number; give a plain number"),
    (["--peft", "bone", "--miss_mini_r", "8"], "--miss_mini_r applies to --miss_mode mini only"),
])
def test_option_checks_run_whatever_the_method(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_args(["--model_preset", "3b", "--dry_run", *argv])


def test_pissa_and_olora_read_the_lora_flags_the_library_reads():
    # train.py passes a method every option of its options class, as apply_peft(**options) takes them
    assert peft_options(flags("--peft", "pissa", "--lora_dropout", "0.1"))["lora_dropout"] == 0.1
    assert peft_options(flags("--peft", "olora", "--pissa_r", "4"))["lora_r"] == 4
    assert peft_options(flags("--peft", "olora", "--pissa_r", "4")) == method_settings("olora", {"pissa_r": 4})


def test_the_table_and_the_options_import_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom rwkv_bone.peft import registry\n"
            "assert registry.method_settings('bone', {'bone_b': 32}) == {'bone_b': 32, 'bone_mode': 'row'}\n"
            "assert registry.option_names() and registry.get_method('miss').label({'miss_r': 8, 'miss_mode': 'default'})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "NO_TORCH"


@pytest.mark.parametrize("method, options", [
    ("bone", {"bone_mode": "row"}), ("bone", {"bone_mode": "col"}), ("bone", {"bone_mode": "ab"}),
    ("lora", {}), ("pissa", {}), ("olora", {}), ("miss", {}), ("miss", {"miss_mode": "mini", "miss_mini_r": 8}),
    ("state", {}),
])
def test_every_tensor_kind_a_layer_holds_is_one_its_code_declares(method, options):
    from rwkv_bone.peft.registry import layer_kinds

    entry = REGISTRY[method]
    shapes = entry.layer_shapes(method_settings(method, options), 64, 64)
    assert set(shapes) <= set(entry.code.kinds) <= set(layer_kinds())

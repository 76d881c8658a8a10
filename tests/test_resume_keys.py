"""--resume refuses every changed method setting (resume_keys() = base keys + every registry option),
checked on the saved settings directly: no training needed."""
from __future__ import annotations

import os

import pytest

from rwkv_bone.errors import UserError
from rwkv_bone.peft.registry import OPTIONS, REGISTRY
from rwkv_bone.train.args import build_parser
from rwkv_bone.train.checkpoints import BASE_RESUME_KEYS, check_resume_settings, resume_keys, resume_settings

# A value other than the default for every registry option (a new option must be added here).
OTHER = {"bone_b": "32", "bone_mode": "col", "lora_r": "8", "lora_alpha": "16", "lora_dropout": "0.1",
         "pissa_r": "4", "svd_niter": "2", "miss_r": "16", "miss_mode": "mini", "miss_mini_r": "8"}


def flags(*extra: str):
    return build_parser().parse_args(["--load_model", "base.pth", "--data_file", "data/pile", *extra])


def test_resume_keys_are_the_base_keys_and_every_option_of_every_method():
    assert set(OPTIONS) == {o for m in REGISTRY.values() for o in m.option_names}
    assert resume_keys() == BASE_RESUME_KEYS + OPTIONS
    assert len(set(resume_keys())) == len(resume_keys())
    assert set(OTHER) == set(OPTIONS)


@pytest.mark.parametrize("key", OPTIONS)
def test_resume_refuses_any_changed_method_option(key):
    saved = resume_settings(flags("--peft", "lora"))
    with pytest.raises(UserError, match=f"resume with the same --{key} "):
        check_resume_settings(saved, flags("--peft", "lora", f"--{key}", OTHER[key]))


def test_resume_with_changed_lora_alpha_names_the_flag_in_one_sentence():
    saved = resume_settings(flags("--peft", "lora", "--lora_alpha", "8"))
    with pytest.raises(UserError) as e:
        check_resume_settings(saved, flags("--peft", "lora", "--lora_alpha", "16"))
    assert str(e.value) == ("--resume: the saved run used --lora_alpha 8.0 but this one has 16.0; resume with "
                            "the same --lora_alpha (or start a new run in another --proj_dir)")
    saved = resume_settings(flags("--peft", "lora"))
    with pytest.raises(UserError, match=r"used no --lora_alpha \(the default\) but this one has 16.0"):
        check_resume_settings(saved, flags("--peft", "lora", "--lora_alpha", "16"))
    saved = resume_settings(flags("--peft", "lora", "--lora_alpha", "16"))
    with pytest.raises(UserError, match="used --lora_alpha 16.0 but this one has no --lora_alpha;"):
        check_resume_settings(saved, flags("--peft", "lora"))


def test_resume_accepts_the_same_settings_a_longer_run_and_old_states():
    saved = resume_settings(flags("--peft", "bone", "--bone_b", "32"))
    check_resume_settings(saved, flags("--peft", "bone", "--bone_b", "32", "--epoch_count", "5"))
    # the same file named another way is the same file
    check_resume_settings(saved, build_parser().parse_args(
        ["--load_model", os.path.abspath("base.pth"), "--data_file", os.path.abspath("data/pile"),
         "--peft", "bone", "--bone_b", "32"]))
    # a state saved before lora_alpha joined the keys lacks it: nothing to compare
    old = {k: v for k, v in resume_settings(flags("--peft", "lora")).items() if k != "lora_alpha"}
    check_resume_settings(old, flags("--peft", "lora", "--lora_alpha", "16"))


def test_changed_method_is_reported_before_its_options():
    saved = resume_settings(flags("--peft", "bone"))
    with pytest.raises(UserError, match="--peft 'bone' but this one has 'lora'"):
        check_resume_settings(saved, flags("--peft", "lora", "--lora_r", "8"))

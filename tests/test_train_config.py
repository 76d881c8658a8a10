"""train.py's typed run configuration (rwkv_bone/train/config.py): sections built once from the flags."""
from __future__ import annotations

import dataclasses

import pytest

from rwkv_bone.train.args import build_parser, parse_args
from rwkv_bone.train.config import SECTIONS, TrainConfig, section_fields

DRY = ["--load_model", "", "--n_layer", "2", "--n_embd", "64", "--peft", "none", "--dry_run"]


def config(argv=DRY) -> TrainConfig:
    return TrainConfig.from_args(parse_args(argv))


def test_every_parser_flag_lands_in_exactly_one_section():
    cfg = config()
    homes: dict[str, list[str]] = {}
    for key in SECTIONS:
        for name in section_fields(SECTIONS[key]):
            homes.setdefault(name, []).append(key)
    for name in cfg.method:
        homes.setdefault(name, []).append("method")
    dests = [a.dest for a in build_parser()._actions if a.dest != "help"]
    for dest in dests:
        assert len(homes.get(dest, [])) == 1, (dest, homes.get(dest))
    assert set(homes) == set(dests)  # no section field that is not a flag


def test_only_adapter_flags_are_left_to_the_method_section():
    parser = build_parser()
    adapter = {a.dest for g in parser._action_groups if g.title == "adapter" for a in g._group_actions}
    assert set(config().method) <= adapter
    assert "peft" in config().method


def test_sections_are_frozen():
    cfg = config()
    for key in SECTIONS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, key), section_fields(SECTIONS[key])[0], None)
    with pytest.raises(TypeError):
        cfg.method["peft"] = "bone"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None


def test_sections_hold_the_validated_values():
    cfg = config(DRY + ["--lr_init", "3e-4", "--micro_bsz", "3", "--seed", "7", "--devices", "2"])
    assert cfg.optim.lr_init == 3e-4 and cfg.optim.lr_final == 3e-4  # lr_final filled by validate
    assert cfg.optim.l2wrap is True  # --peft none: L2Wrap on by default
    assert cfg.data.micro_bsz == 3 and cfg.run.random_seed == 7
    assert cfg.hardware.world_size == 2 and cfg.hardware.bf16
    assert cfg.run.epoch_of(1) == 0 and cfg.run.epoch_of(cfg.run.epoch_steps + 1) == 1


def test_as_dict_gives_back_the_flags_in_parser_order():
    args = parse_args(DRY)
    assert list(TrainConfig.from_args(args).as_dict().items()) == list(vars(args).items())

"""One CLI family: `rwkv-bone TOOL` dispatches to the same parsers as the top-level scripts, every
tool spells --model / --seed / progress the same way (old spellings still accepted), --help answers
without importing torch, and one unescape serves every tool."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_bone.cli import args as cli_args
from rwkv_bone.cli import eval as eval_cli
from rwkv_bone.cli import generate as generate_cli
from rwkv_bone.cli import main as cli_main
from rwkv_bone.cli import make_data as make_data_cli
from rwkv_bone.cli import merge as merge_cli
from rwkv_bone.cli import train as train_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "make_data", "eval", "merge", "generate")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_of_every_script_answers_without_importing_torch(name):
    code = (f"import runpy, sys; sys.argv = [{name!r} + '.py', '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--help" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "NO_TORCH"


@pytest.mark.parametrize("tool", ["train", "make-data", "eval", "merge", "generate"])
def test_console_dispatch_help_names_the_subcommand_and_skips_torch(tool):
    code = ("import sys\nfrom rwkv_bone.cli.main import dispatch\n"
            f"try:\n    dispatch([{tool!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: rwkv-bone {tool}")
    assert r.stderr.strip().splitlines()[-1] == "NO_TORCH"


def test_console_script_is_declared_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    assert "rwkv-bone = rwkv_bone.cli.main:main" in scripts
    assert callable(cli_main.main)


def test_dispatch_unknown_tool_and_bare_call_exit_2(capsys):
    assert cli_main.dispatch(["frobnicate"]) == 2
    assert "unknown tool 'frobnicate'" in capsys.readouterr().err
    assert cli_main.dispatch([]) == 2
    assert cli_main.dispatch(["--help"]) == 0
    assert "make-data" in capsys.readouterr().out


def test_dispatch_runs_the_tool_with_the_rest_of_argv(monkeypatch):
    seen = {}
    monkeypatch.setattr(merge_cli, "main", lambda argv, prog=None: seen.update(argv=argv, prog=prog) or 7)
    assert cli_main.dispatch(["merge", "--model", "b.pth", "--adapter", "a.pth", "--output", "o.pth"]) == 7
    assert seen == {"argv": ["--model", "b.pth", "--adapter", "a.pth", "--output", "o.pth"], "prog": "rwkv-bone merge"}


def test_top_level_scripts_are_shims_over_the_cli_modules():
    import importlib.util

    for name, mod in zip(SCRIPTS, (train_cli, make_data_cli, eval_cli, merge_cli, generate_cli)):
        spec = importlib.util.spec_from_file_location(f"{name}_shim", ROOT / f"{name}.py")
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        assert shim.main is mod.main and shim.build_parser is mod.build_parser


def test_model_is_accepted_by_every_tool_with_the_old_names_as_aliases():
    a = train_cli.build_parser().parse_args(["--model", "m.pth"])
    b = train_cli.build_parser().parse_args(["--load_model", "m.pth"])
    assert a.load_model == b.load_model == "m.pth"
    m1 = merge_cli.parse_args(["--model", "b.pth", "--adapter", "a", "--output", "o"])
    m2 = merge_cli.parse_args(["--base", "b.pth", "--adapter", "a", "--output", "o"])
    assert m1.base == m2.base == "b.pth"
    assert eval_cli.build_parser().parse_args(["--model", "x", "--data", "d", "--task", "gsm8k"]).model == "x"
    assert generate_cli.build_parser().parse_args(["--model", "x", "--prompt", "p"]).model == "x"


def test_adapter_flags_are_the_same_everywhere():
    adapters = ["--adapter", "a", "--adapter", "b", "--lora_alpha", "8", "--pissa_init", "i"]
    for p, rest in ((eval_cli.build_parser(), ["--data", "d", "--task", "exact"]),
                    (generate_cli.build_parser(), ["--prompt", "p"])):
        a = p.parse_args(["--model", "x", *adapters, *rest])
        assert (a.adapter, a.lora_alpha, a.pissa_init) == (["a", "b"], 8.0, "i")
    m = merge_cli.parse_args(["--model", "b", *adapters, "--output", "o"])
    assert (m.adapter, m.lora_alpha, m.pissa_init) == (["a", "b"], 8.0, "i")


def test_seed_and_random_seed_are_one_argument():
    assert train_cli.build_parser().parse_args(["--seed", "7"]).random_seed == 7
    assert train_cli.build_parser().parse_args(["--random_seed", "7"]).random_seed == 7
    assert make_data_cli.build_parser().parse_args(["in.txt", "-o", "x", "--seed", "3"]).seed == 3
    assert eval_cli.build_parser().parse_args(["--model", "x", "--data", "d", "--task", "loss", "--seed", "3"]).seed == 3
    assert generate_cli.build_parser().parse_args(["--model", "x", "--prompt", "p", "--seed", "3"]).seed == 3


@pytest.mark.parametrize("flags, want", [([], True), (["--progress", "0"], False), (["--progress", "1"], True),
                                         (["--no_progress"], False), (["--quiet"], False)])
def test_progress_is_spelled_the_same_in_every_tool(flags, want):
    assert train_cli.build_parser().parse_args(flags).progress is want
    assert make_data_cli.build_parser().parse_args(["in.txt", "-o", "x", *flags]).progress is want
    assert eval_cli.build_parser().parse_args(["--model", "x", "--data", "d", "--task", "loss", *flags]).progress is want


def test_one_unescape_serves_every_tool(monkeypatch):
    assert cli_args.unescape("User: a\\n\\nAssistant:\\tb") == "User: a\n\nAssistant:\tb"
    for mod in (make_data_cli, eval_cli, generate_cli):
        assert mod.unescape is cli_args.unescape
    # the template defaults are shown escaped and come back identical after unescape
    from rwkv_bone.data.prepare import DEFAULT_PROMPT_TEMPLATE

    md = make_data_cli.build_parser().parse_args(["in.txt", "-o", "x"]).prompt_template
    ev = eval_cli.build_parser().parse_args(["--model", "x", "--data", "d", "--task", "loss"]).prompt_template
    assert md == ev and cli_args.unescape(md) == DEFAULT_PROMPT_TEMPLATE


def test_parser_choices_agree_with_the_library():
    from rwkv_bone.eval.evaluate import ALL_TASKS
    from rwkv_bone.generate import DEFAULT_TOP_P
    from rwkv_bone.loading import DTYPES

    assert cli_args.DTYPE_NAMES == tuple(DTYPES)
    assert generate_cli.DEFAULT_TOP_P == DEFAULT_TOP_P
    task = next(a for a in eval_cli.build_parser()._actions if a.dest == "task")
    assert tuple(task.choices) == ALL_TASKS

"""The `skysense` command: help, config composition, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skysense.tasks import cli

pytestmark = pytest.mark.unit


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "skysense.tasks.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    for name in ("ingest", "pretrain", "finetune", "evaluate", "infer", "export", "bench"):
        assert f"  {name}" in r.stdout


def test_subcommand_help_shows_groups_and_config():
    r = run("pretrain", "--help", "model=base")
    assert r.returncode == 0, r.stderr
    assert "model: base, huge, large, small, tiny" in r.stdout
    assert "preset: base" in r.stdout


def test_bad_override_is_a_clear_error():
    r = run("pretrain", "model=nonexistent")
    assert r.returncode == 2
    assert "nonexistent" in r.stderr and "model" in r.stderr
    r = run("pretrain", "trainer.no_such_field=3")
    assert r.returncode == 2
    assert "no_such_field" in r.stderr
    r = run("pretrain", "trainer.max_steps=[oops")
    assert r.returncode == 2
    assert "trainer.max_steps" in r.stderr


def test_both_trainers_take_trainer_keys_and_the_old_finetune_spelling_says_so():
    cfg = cli.compose("finetune", ["trainer.max_steps=7", "trainer.threads=1"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.threads == 1 and "train" not in cfg
    pre = cli.compose("pretrain", [])
    shared = ("max_steps", "batch_size", "device", "threads", "log_every")
    assert all(k in cfg.trainer and k in pre.trainer for k in shared)
    r = run("finetune", "train.max_steps=2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "skysense finetune: override 'train.max_steps=2': train.* is trainer.* now: "
        "trainer.max_steps=2"
    ]


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_composes_its_config(name):
    cmd = cli.COMMANDS[name]
    pos = [f"{p}=x" for p in cmd.positional]
    cfg = cli.compose(cmd.config, pos)
    assert cfg is not None


def test_overrides_reach_the_config():
    cfg = cli.compose("pretrain", ["model=huge", "trainer.max_steps=7", "optim.lr=0.5"])
    assert cfg.model.preset == "huge"
    assert cfg.trainer.max_steps == 7
    assert cfg.optim.lr == 0.5


def test_positional_arguments_become_fields():
    cmd = cli.COMMANDS["ingest"]
    _, overrides, _ = cli._split_args(cmd, ["/a", "/b", "tile_size=32"])
    cfg = cli.compose(cmd.config, overrides)
    assert (cfg.src, cfg.dst, cfg.tile_size) == ("/a", "/b", 32)
    with pytest.raises(cli.ConfigError, match="unexpected argument"):
        cli._split_args(cmd, ["/a", "/b", "/c"])

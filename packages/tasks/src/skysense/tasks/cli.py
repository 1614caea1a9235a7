"""The ``skysense`` command: sub-commands that take Hydra overrides.

    skysense --help
    skysense pretrain model=tiny trainer.max_steps=20
    skysense pretrain --help          # the config groups, their options and the composed config
    skysense ingest SRC DST data.tile_size=64

Each sub-command composes its config from ``skysense/tasks/conf`` (Hydra's compose API, so
errors are ours to word), validates it, then calls ``main(cfg) -> int`` of its module. Modules
are imported only when their sub-command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import resources

from skysense.tasks.errors import ConfigError, report_fault
from skysense.tasks.logs import setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    module: str
    summary: str
    config: str
    positional: tuple[str, ...] = field(default=())
    flags: tuple[str, ...] = field(default=())  # extra --flags the command accepts
    # The first positional takes every argument the others leave (SRC... DST): a list.
    variadic: bool = False


COMMANDS: dict[str, Command] = {
    "ingest": Command(
        "skysense.tasks.ingest",
        "read GeoTIFFs (any CRS, per-band files or stacks) into shards and a manifest",
        "ingest",
        ("src", "dst"),
    ),
    "pretrain": Command(
        "skysense.tasks.pretrain", "pre-train SkySense (MGCL + CMA + GCPL)", "pretrain"
    ),
    "finetune": Command(
        "skysense.tasks.finetune", "fine-tune on a downstream task (task=...)", "finetune"
    ),
    "evaluate": Command(
        "skysense.tasks.evaluate", "evaluate a fine-tuned checkpoint on a task", "finetune"
    ),
    "infer": Command(
        "skysense.tasks.infer",
        "run a trained model over a scene of any size into a georeferenced GeoTIFF",
        "infer",
        ("src", "dst"),
    ),
    "export": Command(
        "skysense.tasks.export", "export an encoder with a task head (torch.export, ONNX)", "export"
    ),
    "convert": Command(
        "skysense.tasks.convert",
        "convert released SkySense .pth files into a weights folder (safetensors)",
        "convert",
        ("src", "dst"),
        variadic=True,
    ),
    "bench": Command(
        "skysense.tasks.bench", "run the benchmark suite and compare with the reference", "bench"
    ),
    "benchmark": Command(
        "skysense.tasks.benchmark",
        "run a suite of dataset x task x protocol entries over seeds, checkpoints and baselines",
        "benchmark",
    ),
    "encoders": Command(
        "skysense.tasks.summary",
        "print an encoder preset's summary (parameter counts)",
        "summary",
        flags=("--summary",),
    ),
}

CONFIG_MODULE = "skysense.tasks.conf"


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: skysense <command> [positional ...] [key=value ...] [--help] [--cfg]",
        "",
        "SkySense: multi-modal remote-sensing foundation model.",
        "",
        "commands:",
    ]
    for name, cmd in COMMANDS.items():
        pos = _positional_usage(cmd)
        lines.append(f"  {name:<{width}}  {cmd.summary}" + (f"  (args: {pos})" if pos else ""))
    lines += [
        "",
        "Each command takes Hydra overrides (key=value, group=option, +new.key=value).",
        "`skysense <command> --help` lists its config groups and shows the composed config.",
        "`skysense <command> --cfg` prints the composed config and exits.",
    ]
    return "\n".join(lines)


def config_groups(config: str) -> dict[str, list[str]]:
    """Config groups under conf/ with their options (file names without .yaml)."""
    root = resources.files(CONFIG_MODULE)
    groups: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("_"):
            opts = sorted(
                e.name[: -len(".yaml")] for e in entry.iterdir() if e.name.endswith(".yaml")
            )
            if opts:
                groups[entry.name] = opts
    from skysense.tasks.conf.schema import structured_options  # the model group: code, not YAML

    for group, opts in structured_options().items():
        groups[group] = sorted({*groups.get(group, []), *opts})
    return dict(sorted(groups.items()))


def compose(config: str, overrides: list[str]):
    """Compose ``conf/<config>.yaml`` with ``overrides``; raises ConfigError on a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from skysense.tasks.conf.schema import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(config_name=config, overrides=list(overrides))
    except Exception as e:  # Hydra raises several unrelated types for bad overrides
        renamed = [o for o in overrides if o.lstrip("+~").startswith("train.")]
        if renamed:  # fine-tuning's train.* became trainer.*, as in pre-training
            o = renamed[0]
            fix = o.replace("train.", "trainer.", 1)
            raise ConfigError(f"override '{o}'", f"train.* is trainer.* now: {fix}") from None
        typed = _type_error(e)
        if typed is not None:
            raise typed from None
        msg = str(e).strip().splitlines()
        detail = " ".join(m.strip() for m in msg if m.strip())
        raise ConfigError(_culprit(overrides), detail) from e
    finally:
        GlobalHydra.instance().clear()


def _type_error(e: BaseException) -> ConfigError | None:
    """A value of the wrong type or an unknown key found by the typed schemas
    (:mod:`skysense.tasks.conf.schema`), as a ConfigError naming the field; None otherwise."""
    from omegaconf.errors import OmegaConfBaseException

    while e is not None:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            first = str(e).strip().splitlines()[0]
            return ConfigError(str(e.full_key), first.replace("Key", "key", 1))
        e = e.__cause__ or e.__context__
    return None


def _culprit(overrides: list[str]) -> str:
    """Name the override that does not parse, where one does not; else "overrides"."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except Exception:
            return f"override '{o}'"
    return "overrides " + " ".join(overrides)


def _split_args(cmd: Command, args: list[str]) -> tuple[list[str], list[str], set[str]]:
    flags = {a for a in args if a.startswith("--")}
    rest = [a for a in args if not a.startswith("--")]
    positional = [a for a in rest if "=" not in a]
    overrides = [a for a in rest if "=" in a]
    if cmd.variadic and len(positional) >= len(cmd.positional):
        n = len(positional) - len(cmd.positional) + 1
        quoted = ["'" + p.replace("\\", "\\\\").replace("'", "\\'") + "'" for p in positional[:n]]
        positional = ["[" + ",".join(quoted) + "]", *positional[n:]]
    if len(positional) > len(cmd.positional):
        extra = positional[len(cmd.positional) :]
        raise ConfigError(
            "arguments",
            f"unexpected argument(s) {extra}; overrides take the form key=value"
            + (
                f"; positional: {' '.join(p.upper() for p in cmd.positional)}"
                if cmd.positional
                else ""
            ),
        )
    for name, value in zip(cmd.positional, positional):
        overrides.insert(0, f"{name}={value}")
    return positional, overrides, flags


def _positional_usage(cmd: Command) -> str:
    """SRC DST, or SRC... DST where the first positional takes several."""
    names = [p.upper() for p in cmd.positional]
    if cmd.variadic and names:
        names[0] += "..."
    return " ".join(names)


def _help(name: str, cmd: Command, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    lines = [f"usage: skysense {name} " + _positional_usage(cmd)]
    lines[0] += " [key=value ...]"
    lines += ["", cmd.summary, "", "config groups (group=option):"]
    for group, opts in config_groups(cmd.config).items():
        lines.append(f"  {group}: {', '.join(opts)}")
    cfg = compose(cmd.config, overrides)
    lines += _commented_keys(cmd.config, overrides)
    lines += ["", "composed config:", OmegaConf.to_yaml(cfg).rstrip()]
    return "\n".join(lines)


def _commented_keys(config: str, overrides: list[str]) -> list[str]:
    """The primary config file and the files of the groups chosen on the command line
    (``task=X``, ``suite=X``, ``data=X``), as written: every key with its comment; a structured
    option (``model=X``) by its documented fields."""
    from skysense.tasks.conf.schema import describe, describe_primary, describe_sections

    root = resources.files(CONFIG_MODULE)
    primary = describe_primary(config)
    if primary is not None:
        files = [(f"{config} (skysense.tasks.conf.commands)", primary)]
    else:
        files = [(f"{config}.yaml", root / f"{config}.yaml")]
        files += [(f"{config}'s {key} (skysense.tasks.conf.schema)", text)
                  for key, text in describe_sections(config).items()]  # fmt: skip
    for o in overrides:
        group, _, option = o.partition("=")
        entry = root / group / f"{option}.yaml"
        if "." not in group and option and entry.is_file():
            files.append((f"{group}/{option}.yaml", entry))
        elif "." not in group and option and (text := describe(group, option)) is not None:
            files.append((f"{group}={option} (skysense.tasks.conf.schema)", text))
    out = []
    for name, f in files:
        text = f if isinstance(f, str) else f.read_text()
        out += ["", f"keys of {name} (with their meaning):", text.rstrip()]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"skysense: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    setup_logging()
    try:
        _, overrides, flags = _split_args(cmd, args)
        if "--help" in flags or "-h" in args:
            print(_help(name, cmd, overrides))
            return 0
        unknown = flags - {"--cfg", "--help", *cmd.flags}
        if unknown:
            raise ConfigError("arguments", f"unknown flag(s) {sorted(unknown)}")
        cfg = compose(cmd.config, overrides)
        if "--cfg" in flags:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        module = importlib.import_module(cmd.module)
        return int(module.main(cfg, command=name) or 0)
    except KeyboardInterrupt:
        print(f"skysense {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `skysense ... | head` closed the pipe: nothing left to say
        _silence_stdout()
        return 0
    except Exception as e:
        if os.environ.get("SKYSENSE_DEBUG") == "1":
            raise
        return report_fault(name, e, argv)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's exit flush does not fail on the closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

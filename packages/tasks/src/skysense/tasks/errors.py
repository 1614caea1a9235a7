"""Errors of the tasks package, and how the command line reports any fault in one line.

Every fault a user can cause or meet (a wrong config value, a bad file, a checkpoint that does
not load, an unwritable folder, a full disk, a lock held by another run) reaches the person as
one line ``skysense <command>: <what, naming the field or path>``; the traceback goes to a debug
log file whose path the line names (``$SKYSENSE_LOG_DIR``, else ``~/.cache/skysense/logs``,
else the system's temporary folder). ``SKYSENSE_DEBUG=1`` lets exceptions through instead.

Exit codes: 2 bad input (config, arguments, files, checkpoints), 1 an environment fault (an
``OSError``: permissions, space, I/O) or a failure of the program itself, 3 a feature that is
not implemented yet, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


class ConfigError(ValueError):
    """A config field (or command-line argument) is wrong. ``field`` names it, dotted."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Modules whose ValueError subclasses describe bad input (files, bands, dates, manifests,
# checkpoints); matched by module so that this module imports none of them.
_INPUT_ERROR_MODULES = ("skysense.data", "skysense.tasks.training.checkpoint", "skysense.encoders")


def is_input_error(e: BaseException) -> bool:
    """A fault of the input (exit 2), not of the environment or of the program: a ConfigError,
    or a ValueError defined or raised by the modules that read files."""
    if isinstance(e, OSError):
        return False  # the environment (a lock held, permissions, space), whoever raised it
    if isinstance(e, ConfigError) or (type(e).__module__ or "").startswith(_INPUT_ERROR_MODULES):
        return True  # the errors those modules define (ManifestError, CheckpointError, ...)
    if not isinstance(e, ValueError):
        return False
    tb, where = e.__traceback__, ""
    while tb is not None:
        where, tb = tb.tb_frame.f_globals.get("__name__", ""), tb.tb_next
    return where.startswith(_INPUT_ERROR_MODULES)


def describe(e: BaseException) -> str:
    """One line for ``e``: an OSError names its path, others their message."""
    if isinstance(e, OSError) and (e.filename or e.strerror):
        what = e.strerror or type(e).__name__
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
        return f"{what}: {paths}" if paths else what
    text = " ".join(str(e).split())
    return text or type(e).__name__


def debug_log_path(command: str) -> Path:
    """A fresh debug log file for ``command`` in the first writable log folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"skysense-{command}-{stamp}-{os.getpid()}.log"
    candidates = [os.environ.get("SKYSENSE_LOG_DIR"), Path.home() / ".cache" / "skysense" / "logs"]
    for folder in [c for c in candidates if c] + [tempfile.gettempdir()]:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = Path(folder) / name
            with open(path, "w"):
                pass
            return path
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def write_debug_log(command: str, e: BaseException, argv: list[str]) -> Path | None:
    """The command line and ``e``'s traceback into a debug log; its path (None if unwritable)."""
    path = debug_log_path(command)
    try:
        with open(path, "w") as f:
            f.write("skysense " + " ".join(argv) + "\n\n")
            traceback.print_exception(type(e), e, e.__traceback__, file=f)
    except OSError:
        return None
    return path


def report_fault(command: str, e: BaseException, argv: list[str]) -> int:
    """Print one line for ``e`` on stderr (the traceback to the debug log); the exit code."""
    if isinstance(e, NotImplementedError):
        print(f"skysense {command}: not implemented yet: {describe(e)}", file=sys.stderr)
        return 3
    plain_config = isinstance(e, ConfigError) and e.__cause__ is None
    log = None if plain_config else write_debug_log(command, e, argv)
    where = f" (details: {log})" if log else ""
    if is_input_error(e):
        print(f"skysense {command}: {describe(e)}{where}", file=sys.stderr)
        return 2
    if isinstance(e, OSError):
        print(f"skysense {command}: {describe(e)}{where}", file=sys.stderr)
        return 1
    print(f"skysense {command}: failed: {type(e).__name__}: {describe(e)}{where}", file=sys.stderr)
    return 1

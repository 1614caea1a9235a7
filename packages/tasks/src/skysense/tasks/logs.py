"""One logging format for the whole project.

Every module logs through ``logging.getLogger(__name__)``; only entry points (the ``skysense``
command, scripts, benchmarks) call :func:`setup_logging`, so a library user keeps control of
their own handlers.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


def setup_logging(level: int | str | None = None, rank: int | None = None) -> None:
    """Configure the root logger once: the project's format, to stderr.

    ``level`` defaults to ``$SKYSENSE_LOG_LEVEL`` or INFO. In a multi-process run only rank 0
    logs at ``level``; other ranks log warnings and errors only, with their rank in the prefix.
    """
    if level is None:
        level = os.environ.get("SKYSENSE_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    fmt = FORMAT if rank == 0 else f"[rank {rank}] {FORMAT}"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_skysense", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, DATEFMT))
    handler._skysense = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))

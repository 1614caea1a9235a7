"""Backend bookkeeping shared by every op: which backend ran last, and forcing one.

A backend is chosen per call from device, dtype and shape. Tests and benchmarks force one with
:func:`force_backend` (or ``SKYSENSE_BACKEND_<OP>=name`` in the environment); a forced backend
that cannot take the inputs raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import os
import threading

_state = threading.local()
_last: dict[str, str] = {}


def _forced() -> dict[str, str]:
    if not hasattr(_state, "forced"):
        _state.forced = {}
    return _state.forced


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` (context manager first, then the environment), or None."""
    f = _forced()
    if op in f:
        return f[op]
    if "*" in f:
        return f["*"]
    return os.environ.get(f"SKYSENSE_BACKEND_{op.upper()}") or None


@contextlib.contextmanager
def force_backend(op: str, backend: str):
    """Force ``backend`` for ``op`` ("*" for every op) inside the ``with`` block."""
    f = _forced()
    old = f.get(op)
    f[op] = backend
    try:
        yield
    finally:
        if old is None:
            f.pop(op, None)
        else:
            f[op] = old


def record(op: str, backend: str) -> None:
    _last[op] = backend


def last_backend(op: str) -> str | None:
    """Name of the backend that served the last call of ``op`` in this process."""
    return _last.get(op)

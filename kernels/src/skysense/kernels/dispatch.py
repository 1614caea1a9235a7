"""Backend bookkeeping shared by every op: which backend ran last, and forcing one.

A backend is chosen per call from device, dtype and shape. Tests and benchmarks force one with
:func:`force_backend` (or ``SKYSENSE_BACKEND_<OP>=name`` in the environment); a forced backend
that cannot take the inputs raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)

_state = threading.local()
_last: dict[str, str] = {}
_seen: set[tuple[str, str]] = set()


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
    """Note that ``backend`` served ``op`` (logged at INFO the first time, DEBUG after).

    Under ``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling()``) only the name
    is kept: a logging call there would break the graph, and the code being traced runs once
    anyway.
    """
    import torch

    _last[op] = backend
    if torch.compiler.is_compiling():
        return
    if (op, backend) not in _seen:
        _seen.add((op, backend))
        log.info("%s: backend %s", op, backend)
    else:
        log.debug("%s: backend %s", op, backend)


def last_backend(op: str) -> str | None:
    """Name of the backend that served the last call of ``op`` in this process."""
    return _last.get(op)


# --- backend availability and test hooks -------------------------------------------------------

_POISON_ENV = "SKYSENSE_KERNELS_POISON"


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can).

    On CUDA they need an importable triton; on the CPU they run only under the interpreter, which
    the test tier switches on (tests/conftest.py) before triton is imported.
    """
    import torch

    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"the Triton kernels need CUDA tensors (got {device.type}); on the CPU they run only "
        "under the interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    )


TRITON_DTYPES = ("float32", "float16", "bfloat16")


def triton_reason(x) -> str | None:
    """Why the Triton kernels cannot take tensor ``x`` (device, triton, dtype), or None."""
    reason = triton_unavailable_reason(x.device)
    if reason is None and str(x.dtype).removeprefix("torch.") not in TRITON_DTYPES:
        reason = f"the Triton kernels take fp32, fp16 or bf16, got {x.dtype}"
    return reason


def choose(op: str, backends, reasons, auto, fallback: str) -> str:
    """The one backend choice of every op: the forced backend if any (checked: a forced backend
    that cannot take the inputs raises), else the first of ``auto`` whose reason is None, else
    ``fallback``.

    Args:
        op: the op's name (``SKYSENSE_BACKEND_<OP>`` and :func:`force_backend` key).
        backends: every backend name the op knows.
        reasons: backend -> zero-argument callable giving why it cannot take these inputs
            (None when it can); backends without an entry take anything.
        auto: the backends to try, in order, when none is forced.
        fallback: the backend when none of ``auto`` can.
    """
    forced = forced_backend(op)
    if forced is not None:
        if forced not in backends:
            raise ValueError(f"{op}: unknown backend {forced!r}; one of {tuple(backends)}")
        check = reasons.get(forced)
        reason = check() if check is not None else None
        if reason:
            raise RuntimeError(f"{op}: backend '{forced}' forced but {reason}")
        return forced
    for name in auto:
        if reasons[name]() is None:
            return name
    return fallback


def thread_flag(name: str) -> bool:
    """The per-thread test switch ``name`` (off unless :func:`set_thread_flag` is active)."""
    return getattr(_state, f"flag_{name}", False)


@contextlib.contextmanager
def set_thread_flag(name: str, enabled: bool = True):
    """Turn the per-thread test switch ``name`` on (or off) inside the ``with`` block."""
    key = f"flag_{name}"
    old = getattr(_state, key, False)
    setattr(_state, key, enabled)
    try:
        yield
    finally:
        setattr(_state, key, old)


def poisoning() -> bool:
    """Whether launchers fill their outputs with NaN before the kernel runs (tests set this so
    that an element a kernel forgot to write shows up)."""
    return thread_flag("poison") or os.environ.get(_POISON_ENV, "0") == "1"


def poison_outputs(enabled: bool = True):
    """Inside the block, kernel launchers allocate their outputs filled with NaN."""
    return set_thread_flag("poison", enabled)


# --- the chunked engines' block size -------------------------------------------------------------

_BLOCK_ELEMS: int | None = None  # elements of one slab of logits; None = slab_elems() (tests)


def slab_elems(total: int) -> int:
    """Elements of one block of logits of the chunked loss engines for a (rows x cols) =
    ``total`` problem: at most 1/32 of the whole matrix (the peak stays far below the naive
    loss's several full matrices), but 4M-16M elements, where a block's matmuls run near full
    speed on the CPU."""
    if _BLOCK_ELEMS is not None:
        return _BLOCK_ELEMS
    return min(1 << 24, max(1 << 22, total // 32))


def no_autocast(t):
    """Autocast off inside the loss engines: under bf16 / fp16 autocast every block's matmul
    would round the logits (and G y) to half precision (3-7 % relative error in the heads'
    gradients); the engines read half-precision operands and accumulate in float32 instead."""
    import torch

    return torch.autocast(device_type=t.device.type, enabled=False)


def new_output(shape, dtype, device):
    """``torch.empty``, or NaN-filled (integers: -1) while :func:`poisoning`."""
    import torch

    if not poisoning():
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)

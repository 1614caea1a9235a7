"""Checkpoints written atomically: a kill at any moment leaves the previous checkpoint intact.

A checkpoint is one ``torch.save`` file ``step_<N>.pt`` in ``<run_dir>/checkpoints``; it is
written to a temporary name in the same folder, flushed to disk, then renamed (atomic on POSIX),
and only then is ``latest`` (a one-line text file naming it) replaced the same way. Readers trust
``latest`` and never see a partial file.

Contents (a dict of tensors and plain values: it loads with ``torch.load(weights_only=True)``):
``student``, ``teacher`` (the SkySense encoders' state_dicts, what downstream tasks read),
``student_module``, ``teacher_module`` (the whole towers: encoder, projection heads, CMA
projections, teacher centres), ``optimizer``, ``step`` (optimizer steps done),
``data_position`` (global batches consumed), ``rng`` (one entry per process: python, numpy,
torch, cuda), ``config`` (the composed config as a plain dict), ``history`` (logged losses so
far), ``loss_terms`` (the term names).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` into a temporary file beside ``path``, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    """The RNG states of this process as tensors and plain Python values only, so that a
    checkpoint loads with ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state)
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (also the older pickled-object form)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["keys"].numpy().astype(np.uint32)
        npy = (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically, point ``latest`` at it, and remove
    older checkpoints beyond the ``keep`` newest. Returns the checkpoint's path."""
    ckpt_dir = Path(ckpt_dir)
    # Leftovers of a save that was killed: only one process writes checkpoints, so any
    # temporary file here is stale.
    for stale in ckpt_dir.glob(".step_*.tmp"):
        stale.unlink(missing_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    atomic_write_bytes(ckpt_dir / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    old = sorted(ckpt_dir.glob("step_*.pt"))[:-keep] if keep > 0 else []
    for p in old:
        if p != path:
            p.unlink(missing_ok=True)
    return path


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir`` (as named by ``latest``), or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not path.exists():
        log.warning("%s names %s, which is missing", pointer, path.name)
        return None
    return path


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save` (tensors and plain values only:
    ``weights_only=True``; a checkpoint of an older version that pickled objects, from this run's
    own folder, is unpickled in full)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s holds pickled objects (an older checkpoint): loading it in full", path)
        return torch.load(path, map_location=map_location, weights_only=False)

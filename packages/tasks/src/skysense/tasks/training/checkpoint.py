"""Checkpoints written atomically, verified on load, never loaded with code execution.

A checkpoint is one ``torch.save`` file ``step_<N>.pt`` in ``<run_dir>/checkpoints``; it is
written to a temporary name in the same folder, flushed to disk, then renamed (atomic on POSIX);
its SHA-256 goes beside it (``step_<N>.pt.sha256``), and only then is ``latest`` (a one-line
text file naming it) replaced the same way. A kill at any moment leaves the previous checkpoint
intact.

Loading is ``torch.load(weights_only=True)`` and nothing else: a file that holds Python objects
beyond tensors and plain containers is refused (unpickling it could run code), as is any file
that does not load, with one line naming the path and the reason (:class:`CheckpointError`).

Resuming (:func:`find_resumable`) trusts no single file: ``latest`` is a hint that must name a
file inside the folder; the checkpoints are tried newest first, each verified against its
checksum and by loading it, and a corrupt one is skipped with a warning naming it and the one
used instead. A folder that holds checkpoints of which none loads is an error, never a fresh
start that would overwrite them.

Contents (a dict of tensors and plain values): ``student``, ``teacher`` (the SkySense encoders'
state_dicts, what downstream tasks read), ``student_module``, ``teacher_module`` (the whole
towers: encoder, projection heads, CMA projections, teacher centres), ``optimizer``, ``step``
(optimizer steps done), ``data_position`` (global batches consumed), ``rng`` (one entry per
process: python, numpy, torch, cuda), ``config`` (the composed config as a plain dict),
``history`` (logged losses so far), ``loss_terms`` (the term names).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from skysense.data.shards import fsync_dir

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKSUM_SUFFIX = ".sha256"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the path and why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` into a temporary file beside ``path``, fsync, rename. On any
    failure (a full disk, a kill signal turned into an exception) the temporary file is removed
    and ``path`` is as it was; a write that failed for lack of space or permission raises that
    OSError naming ``path`` (torch.save reports it as a RuntimeError of its own otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            guard = _Writer(f)
            try:
                write(guard)
            except Exception as e:
                if guard.error is not None and guard.error is not e:
                    raise guard.error from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Writer:
    """A write-only file object that remembers the OSError of a failed write (torch.save turns
    it into a RuntimeError), and hashes what passes through when given a digest."""

    def __init__(self, f, digest=None):
        self._f, self._digest, self.error = f, digest, None

    def write(self, data) -> int:
        if self._digest is not None:
            self._digest.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def resolve_inside(folder: str | Path, name: str, source: str | Path) -> Path:
    """``folder / name`` resolved, which must lie inside ``folder``: a path read from a file
    (``source``) never reaches outside the folder it describes. Raises :class:`CheckpointError`
    naming ``source`` and the path otherwise."""
    folder = Path(folder).resolve()
    target = (folder / name).resolve()
    if target != folder and folder not in target.parents:
        raise CheckpointError(
            source, f"names {name!r}, which resolves outside {folder} (refused: {target})"
        )
    return target


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_load(path: str | Path, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors, plain values and containers only.

    Raises:
        CheckpointError: one line naming ``path`` and the reason (missing, not a file, truncated
            or not a torch file, or holding Python objects, which are refused because unpickling
            them could run code).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    if not path.is_file():
        raise CheckpointError(path, "is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # an environment fault (permissions, I/O): the command line names it
    except Exception as e:
        raise CheckpointError(path, f"cannot be loaded: {_load_reason(path, e)}") from e


def _load_reason(path: Path, e: Exception) -> str:
    import zipfile

    text = " ".join(str(e).split())
    if not zipfile.is_zipfile(path) and "Weights only load failed" not in text:
        return f"truncated or not a torch file ({type(e).__name__})"
    if "Weights only load failed" in text or "Unsupported global" in text:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (
            f"it holds Python objects{what} besides tensors and plain values; refused, since "
            "unpickling them could run code (re-save it with tensors only, or convert it)"
        )
    if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return f"truncated or not a torch file ({type(e).__name__})"
    return f"{type(e).__name__}: {text[:200]}"


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
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The ``step_<N>.pt`` files of ``ckpt_dir``, newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically with its checksum, point ``latest`` at
    it, and remove older checkpoints beyond the ``keep`` newest. Returns the checkpoint's
    path."""
    ckpt_dir = Path(ckpt_dir)
    # Leftovers of a save that was killed: only one process writes checkpoints, so any
    # temporary file here is stale.
    for stale in ckpt_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    digest = hashlib.sha256()

    def write(f):
        torch.save(state, _Writer(f, digest))

    atomic_write_bytes(path, write)
    line = f"{digest.hexdigest()}  {path.name}\n".encode()
    atomic_write_bytes(_checksum_path(path), lambda f: f.write(line))
    atomic_write_bytes(ckpt_dir / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    for p in checkpoints(ckpt_dir)[keep:] if keep > 0 else []:
        if p != path:
            p.unlink(missing_ok=True)
            _checksum_path(p).unlink(missing_ok=True)
    return path


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def verify(path: Path) -> None:
    """Check ``path`` against its stored SHA-256 (where one was stored); raise
    :class:`CheckpointError` on a mismatch."""
    side = _checksum_path(path)
    if not side.exists():
        return
    expected = side.read_text().split()[0] if side.read_text().split() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            path, f"checksum mismatch (stored {expected[:12]}..., file {actual[:12]}...)"
        )


def latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names (which must lie inside ``ckpt_dir``), or None where there
    is no pointer or it names a missing file (with a warning)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    path = resolve_inside(ckpt_dir, pointer.read_text().strip(), pointer)
    if not path.exists():
        log.warning("%s names %s, which is missing", pointer, path.name)
        return None
    return path


def load(path: Path, map_location="cpu") -> dict:
    """Verify (checksum) and load one checkpoint written by :func:`save`."""
    path = Path(path)
    if path.exists():
        verify(path)
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(path, "is not a pre-training checkpoint (no 'step' entry)")
    return state


def find_resumable(ckpt_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of ``ckpt_dir`` that verifies and loads, with its state; None when
    the folder holds no checkpoint.

    ``latest`` is read first (it must name a file inside the folder); when what it names is
    missing or corrupt, the older checkpoints are tried newest first, each skipped one with a
    warning. Raises :class:`CheckpointError` when checkpoints exist and none loads (a fresh
    start would overwrite them).
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = checkpoints(ckpt_dir)
    hinted = latest(ckpt_dir)
    if hinted is not None and hinted in candidates:
        candidates.remove(hinted)
        candidates.insert(0, hinted)
    failures: list[str] = []
    for path in candidates:
        try:
            state = load(path, map_location)
        except CheckpointError as e:
            failures.append(str(e))
            log.warning("%s; trying an older checkpoint", e)
            continue
        if failures:
            log.warning("resuming from %s instead (skipped: %s)", path.name, "; ".join(failures))
        return path, state
    if failures:
        raise CheckpointError(
            ckpt_dir, f"holds {len(failures)} checkpoint(s), none loads: " + "; ".join(failures)
        )
    return None

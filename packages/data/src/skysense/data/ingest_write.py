"""Ingest, writing: the destination's lock, the shard stream, and clean-up of temporary files.

- :class:`DstLock`: one ingest at a time per destination folder. ``fcntl.flock`` on
  ``DST/.ingest.lock`` (exclusive, non-blocking): a second ingest stops at once with
  :class:`IngestLockedError` (an ``OSError`` naming the lock file and the holder's pid). The lock
  goes with the process, so a killed ingest never leaves a stale lock behind.
- :class:`ShardStream`: tile references in, shards of exactly ``shard_size`` samples out (the last one of
  an ingest may be smaller). A shard's folder is written whole (``.tmp`` then renamed) and its
  sample rows committed to the manifest in one transaction, together with the places whose last
  tile it holds. A place is the unit of resuming: an interrupted place is redone and its tiles
  that reached a committed shard are skipped, so the result equals an uninterrupted run's.
- :func:`remove_temporaries`: ``.tmp`` shard folders and spill files of this or an earlier run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from skysense.data.dates import from_days
from skysense.data.ingest_plan import CHANNELS, MODEL_BANDS, IngestConfig, Plan
from skysense.data.manifest import ManifestWriter
from skysense.data.shards import CLEAR, HAS_DATA, SHARD_DIR, STEP_USABLE, pack, write_shard
from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)

LOCK_NAME = ".ingest.lock"
SPILL_DIR = ".spill"


class IngestLockedError(BlockingIOError):
    """Another ingest holds ``DST/.ingest.lock``; ``filename`` is the lock file, ``pid`` its holder."""

    def __init__(self, path, pid: int | None):
        holder = f"pid {pid}" if pid else "a process whose pid it did not record"
        super().__init__(
            errno.EWOULDBLOCK,
            f"another ingest ({holder}) is writing to this folder; wait for it to finish or "
            "stop it",
            str(path),
        )
        self.pid = pid

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class DstLock:
    """The exclusive lock of an ingest's destination folder (a context manager)."""

    def __init__(self, dst):
        self.dst = Path(dst)
        self.path = self.dst / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DstLock:
        self.dst.mkdir(parents=True, exist_ok=True)  # OSError naming the folder if it cannot
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise IngestLockedError(self.path, int(text) if text.isdigit() else None) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk: name the file (os.pwrite does not)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DstLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_temporaries(dst) -> None:
    """Remove ``.tmp`` shard folders and the spill folder (an interrupted or failed run's)."""
    dst = Path(dst)
    shutil.rmtree(dst / SPILL_DIR, ignore_errors=True)
    d = dst / SHARD_DIR
    if d.is_dir():
        for p in d.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def shard_stats(arrays: dict, modalities) -> list[tuple]:
    """(modality, band, count, sum, sumsq, min, max) over the valid, clear pixels of a shard."""
    out = []
    for m in modalities:
        data, mask = arrays[m], arrays[f"{m}_mask"]
        sel = mask == (HAS_DATA | CLEAR)
        vals = data[sel]
        for i, b in enumerate(MODEL_BANDS[m]):
            v = vals[..., i].astype(np.float64)
            if len(v) == 0:
                continue
            out.append(
                (
                    m,
                    b,
                    int(len(v)),
                    float(v.sum()),
                    float((v * v).sum()),
                    float(v.min()),
                    float(v.max()),
                )
            )
    return out


def sample_row(sid: int, shard: int, offset: int, t: dict, modalities) -> dict:
    """The ``samples`` row of tile record ``t`` (see :class:`skysense.data.manifest`)."""
    row = {
        "id": sid,
        "name": t["name"],
        "grp": t["grp"],
        "split": t["split"],
        "shard": shard,
        "offset": offset,
        "lat": t["lat"],
        "lon": t["lon"],
        "label": t["label"][0] if len(t["label"]) == 1 else -1,
        "labels": json.dumps(list(t["label"])) if t["label"] else None,
        "crs": t["crs"],
        "minx": t["bounds"][0],
        "miny": t["bounds"][1],
        "maxx": t["bounds"][2],
        "maxy": t["bounds"][3],
        "row": t["row"],
        "col": t["col"],
    }
    for m in MODALITIES:
        if m in modalities and t.get(m) is not None:
            days = np.atleast_1d(t[m]["days"])
            step = np.atleast_1d(t[m]["step"])
            row[f"{m}_dates"] = ",".join(from_days(d).isoformat() if d else "" for d in days)
            row[f"{m}_valid"] = "".join("1" if s == STEP_USABLE else "0" for s in step)
        else:
            row[f"{m}_dates"], row[f"{m}_valid"] = None, None
    return row


def tile_shapes(plan: Plan) -> dict:
    """{modality: (side, side, channels)} of one tile in the shards."""
    side = {
        m: plan.tile_size * (plan.hr_ratio if m == "hr" and not plan.hr_only else 1)
        for m in CHANNELS
    }
    return {m: (side[m], side[m], CHANNELS[m]) for m in plan.modalities}


def build_shard(
    dst, sid: int, first_id: int, parts, plan: Plan, codecs: dict | None = None, quality: int = 90
) -> tuple[dict, list, list]:
    """Write shard ``sid`` from tiles in spill files; return what the manifest commits.

    ``parts``: ``[(PlaceResult, [j, ...]), ...]``, the shard's tiles in order (indices into
    each place's valid tiles); ``first_id``: the id of the shard's first sample. Runs in the
    ingest's process or on a Dask worker (it touches only ``dst`` and the spill files, never
    the manifest). Returns ``(shard row, sample rows, statistics rows)`` for
    :meth:`ManifestWriter.commit`. ``codecs``, ``quality``: compressed shards
    (:meth:`IngestConfig.codecs`).
    """
    tiles = [t for res, js in parts for t in res.read_tiles(js)]
    mods = plan.modalities
    arrays = pack(tiles, mods, tile_shapes(plan))
    rel = write_shard(dst, sid, arrays, codecs, quality)
    steps = {m: int(arrays[f"{m}_step"].shape[1]) for m in mods if m != "hr"}
    shard = {"id": sid, "path": rel.as_posix(), "n": len(tiles), "steps": steps}
    rows = [sample_row(first_id + i, sid, i, t, mods) for i, t in enumerate(tiles)]
    # Statistics per place within the shard, so that a place redone later takes its own out.
    by_place: dict[str, list[int]] = {}
    for i, t in enumerate(tiles):
        by_place.setdefault(t["grp"], []).append(i)
    stats = []
    for grp, idx in by_place.items():
        part = arrays if len(idx) == len(tiles) else {k: v[idx] for k, v in arrays.items()}
        stats += [(*s, grp) for s in shard_stats(part, mods)]
    return shard, rows, stats


class ShardStream:
    """Tile references in, shards out (see the module docstring).

    ``add(res, j)`` for every tile of a place (``j`` indexes the valid tiles of its
    :class:`~skysense.data.ingest_align.PlaceResult`; the pixels stay in the place's spill
    file), then ``place_done(row, res)`` with its groups-table row; ``close()`` at the end writes
    the last, smaller shard. A shard's tiles are read from the spill files only when it is
    written, by ``write`` (:func:`build_shard` here, or the same function on a Dask worker), so
    at most ``shard_size`` tiles are in memory; a place's spill file is removed once its last
    tile is in a committed shard. ``on_shard(i)`` is called after shard ``i`` is committed.
    Only this object (the ingest's process) writes the manifest.
    """

    def __init__(
        self,
        writer: ManifestWriter,
        dst: Path,
        plan: Plan,
        cfg: IngestConfig,
        on_shard: Callable[[int], None] | None = None,
        write: Callable | None = None,
    ):
        self.writer, self.dst, self.plan, self.cfg = writer, Path(dst), plan, cfg
        self.on_shard = on_shard
        self.write = write or build_shard
        self.n_shards = writer.n_shards()
        self.n_samples = writer.n_samples()
        self.buffer: list[tuple] = []  # (PlaceResult, j)
        self.pending: list[dict] = []  # places whose last tile is in the buffer
        self.finished: list = []  # their PlaceResults (spill files to remove after the commit)

    def add(self, res, j: int) -> None:
        # A full buffer is written when the next tile comes (or its place ends), so the shard
        # commits together with the places it completes.
        if len(self.buffer) >= self.cfg.shard_size:
            self._flush()
        self.buffer.append((res, j))

    def place_done(self, row: dict, res=None) -> None:
        if not self.buffer:
            self.writer.commit([], [row], last_shard=self.n_shards - 1)
            if res is not None:
                res.discard()
            return
        self.pending.append(row)
        if res is not None:
            self.finished.append(res)
        if len(self.buffer) >= self.cfg.shard_size:
            self._flush()

    def close(self) -> None:
        if self.buffer:
            self._flush()
        elif self.pending:
            self.writer.commit([], self.pending, last_shard=self.n_shards - 1)
            self.pending = []

    def discard(self) -> None:
        """Remove the spill files still held (an ingest that stops early)."""
        for res, _ in self.buffer:
            res.discard()
        for res in self.finished:
            res.discard()

    def _flush(self) -> None:
        refs, self.buffer = self.buffer, []
        parts: list[tuple] = []
        for res, j in refs:
            if parts and parts[-1][0] is res:
                parts[-1][1].append(j)
            else:
                parts.append((res, [j]))
        sid = self.n_shards
        shard, rows, stats = self.write(
            self.dst,
            sid,
            self.n_samples,
            parts,
            self.plan,
            self.cfg.codecs(),
            self.cfg.jpeg_quality,
        )
        self.writer.commit([(shard, rows, stats)], self.pending)
        self.pending = []
        for res in self.finished:
            res.discard()
        self.finished = []
        self.n_shards += 1
        self.n_samples += len(refs)
        if self.on_shard is not None:
            self.on_shard(sid)

"""Ingest: a folder of GeoTIFFs -> aligned, masked tiles in shards + a SQLite manifest.

``ingest(src, dst, IngestConfig(...))`` (the ``skysense ingest SRC DST`` command) runs in four
parts, one module each:

1. **Discover** (:mod:`skysense.data.discover`): sensor, band, date and place of every file;
   bad files are reported and left out.
2. **Plan** (:mod:`skysense.data.ingest_plan`): modalities, tile and HR ratio shared by every
   place; labels and splits.
3. **Align** (:mod:`skysense.data.ingest_align`) each place: its grid, every band warped onto
   it with validity and cloud masks, cut into ``tile_size`` tiles (with the matching HR tile)
   spread evenly over the place; each tile gets its centre's latitude and longitude, per-step
   dates and a usable flag (share of clear valid pixels >= ``min_valid_fraction``). Tiles
   without any valid pixel are dropped. Memory is bounded by construction: windowed reads in
   blocks of about ``block_pixels`` pixels, tiles spilled to disk, so peak memory does not grow
   with the size of a place.
4. **Write** (:mod:`skysense.data.ingest_write`): shards of ``shard_size`` samples, each
   committed to the manifest (:mod:`skysense.data.manifest`) in one transaction with the places
   it completes; per-band statistics at the end.

The destination is guarded: an exclusive lock (a second ingest into it stops at once, naming
the lock and its holder's pid); the source folder and the settings are recorded in the
manifest and compared on the next run (another source or other settings are an error unless
``mode=append`` or ``overwrite=true``).

Resumable: a rerun skips the places already committed and redoes the rest (tiles of a half-done
place that reached a committed shard are not written again), so a killed ingest resumes to the
same result. Every run examines the source again, so the bad-file list (one line per file, path
and reason) is never stale: a place that gave no tile because of bad files is tried again, and
a committed place whose files changed (a bad file repaired, a band file added) is redone (its
samples are dropped from the manifest, their tiles stay unreferenced in the shards). Bad inputs (unreadable or truncated file, band count or dtype
wrong for the sensor, no CRS, no overlap between sensors, place entirely nodata, unparseable
date) are listed in the report and the manifest's ``bad_files``; the good files finish.
Environment faults (an unwritable folder, a full disk) raise ``OSError`` naming the path, after
the temporary files (``.tmp`` shard folders, spill files) are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import rasterio

from skysense.data.discover import MODALITY_ORDER, discover
from skysense.data.ingest_align import (
    PlaceResult,
    Sources,
    align_place,
    place_grid,
    read_acquisition,
    tile_blocks,
    to_store,
)
from skysense.data.ingest_dask import DaskPlaces, cluster_spec
from skysense.data.ingest_plan import (
    CHANNELS,
    MODEL_BANDS,
    STORE_DTYPES,
    IngestConfig,
    Plan,
    labels_and_splits,
    make_plan,
    read_labels,
    sensor_normalisation,
)
from skysense.data.ingest_write import (
    LOCK_NAME,
    SPILL_DIR,
    DstLock,
    IngestLockedError,
    ShardStream,
    remove_temporaries,
)
from skysense.data.io import BadInputError
from skysense.data.manifest import FILENAME, VERSION, ManifestError, ManifestWriter
from skysense.data.shards import SHARD_DIR, clean_partial

log = logging.getLogger(__name__)

GDAL_CACHE_MB = 32  # GDAL's block cache during an ingest ($GDAL_CACHEMAX overrides)


class IngestConflictError(ManifestError, ValueError):
    """``dst`` holds an ingest that this one does not continue: another source folder, other
    settings, other sensors. ``field`` names the setting that differs ("src" for the source)."""

    def __init__(self, message: str, field: str = "src"):
        super().__init__(message)
        self.field = field


@dataclass
class IngestReport:
    """What an ingest did: counts, the manifest's path and the bad files with their reasons."""

    manifest: Path
    n_samples: int = 0
    n_shards: int = 0
    n_places: int = 0
    n_places_skipped: int = 0
    n_tiles_dropped: int = 0
    n_places_redone: int = 0
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return not self.bad_files

    def format_bad_files(self) -> str:
        """One line per bad file: ``path: reason`` (each file once)."""
        if not self.bad_files:
            return "bad files: none"
        lines = [f"bad files ({len(self.bad_files)}):"]
        return "\n".join(lines + [f"  {p}: {r}" for p, r in self.bad_files])

    def format(self) -> str:
        return "\n".join(
            [
                f"manifest: {self.manifest}",
                f"samples: {self.n_samples} in {self.n_shards} shard(s) from {self.n_places} "
                f"place(s) ({self.n_places_skipped} already done"
                + (
                    f", {self.n_places_redone} redone: files changed"
                    if self.n_places_redone
                    else ""
                )
                + f"), {self.n_tiles_dropped} "
                f"tile(s) dropped as entirely nodata, {self.seconds:.1f} s",
                self.format_bad_files(),
            ]
        )


def _once(bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each file once, with its first reason."""
    seen: dict[str, str] = {}
    for p, r in bad:
        seen.setdefault(str(p), r)
    return list(seen.items())


def _run_places(groups, plan, cfg, splits, labels, spill, dask) -> Iterator[PlaceResult]:
    args = [(g, plan, cfg, splits[g.name], labels[g.name], spill) for g in groups]
    if dask is not None:
        yield from dask.places(args)
    elif cfg.workers and cfg.workers > 0 and len(groups) > 1:
        from concurrent.futures import ProcessPoolExecutor

        window = 4 * cfg.workers
        with ProcessPoolExecutor(cfg.workers) as ex:
            pending = []
            try:
                for a in args:
                    pending.append(ex.submit(align_place, *a))
                    if len(pending) >= window:
                        yield pending.pop(0).result()
                while pending:
                    yield pending.pop(0).result()
            finally:
                for p in pending:
                    p.cancel()
    else:
        for a in args:
            yield align_place(*a)


def ingest(
    src,
    dst,
    cfg: IngestConfig | None = None,
    *,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    **overrides,
) -> IngestReport:
    """Ingest the GeoTIFFs under ``src`` into shards and ``dst/manifest.sqlite``.

    ``cfg`` (or keyword overrides of :class:`IngestConfig` fields) sets the tiling. A rerun on
    the same ``dst`` resumes: places already committed are skipped, places that gave no tile
    are tried again (pass ``overwrite=True`` to redo everything). ``on_shard(i)`` is called
    after shard ``i`` is committed (progress hooks, tests). Returns an :class:`IngestReport`;
    bad files do not raise, they are in ``report.bad_files``.

    Raises :class:`BadInputError` when no file gives a tile, :class:`IngestConflictError` when
    ``dst`` holds the ingest of another source or other settings, :class:`IngestLockedError`
    when another ingest holds ``dst``, ``OSError`` (with ``filename``) for environment faults.
    """
    cfg = dataclasses.replace(cfg or IngestConfig(), **overrides)
    # One GDAL environment for the whole run (rasterio otherwise sets one up per call), and no
    # directory listing on open: folders of per-band files hold many files.
    gdal = gdal_options()
    with rasterio.Env(**gdal):
        t0 = time.perf_counter()
        # Absolute, so that the files recorded in the manifest compare equal on the next run
        # whatever the working folder (symbolic links are kept as written).
        src, dst = Path(os.path.abspath(src)), Path(dst)
        if not src.exists():
            raise FileNotFoundError(errno.ENOENT, "source folder not found", str(src))
        mpath = dst / FILENAME
        with DstLock(dst):
            try:
                report = _ingest(src, dst, cfg, progress, on_shard)
            except sqlite3.Error as e:
                raise _db_error(e, mpath) from e
            finally:
                remove_temporaries(dst)
        report.seconds = time.perf_counter() - t0
    log.info(
        "ingest: %d samples, %d shards, %d bad file(s) in %.1f s",
        report.n_samples,
        report.n_shards,
        len(report.bad_files),
        report.seconds,
    )
    return report


def gdal_options() -> dict:
    """GDAL settings of an ingest (also sent to Dask workers with every place)."""
    gdal = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    if "GDAL_CACHEMAX" not in os.environ:
        # GDAL keeps decoded blocks up to 5 % of the machine's memory by default, so its cache
        # would grow with the size of the file read; blocks are read in order, so a small
        # cache loses little and keeps memory flat.
        gdal["GDAL_CACHEMAX"] = GDAL_CACHE_MB
    return gdal


def _db_error(e: sqlite3.Error, path: Path) -> Exception:
    """An SQLite error as the error it is: a full disk or an unwritable file (OSError naming
    the manifest), or a file that is no manifest (ManifestError)."""
    msg = str(e)
    if "full" in msg:
        return OSError(errno.ENOSPC, f"cannot write the manifest: {msg}", str(path))
    if "not a database" in msg or "malformed" in msg:
        return ManifestError(f"{path}: not a usable manifest ({msg}); overwrite=true replaces it")
    if "readonly" in msg or "unable to open" in msg:
        return OSError(errno.EACCES, f"cannot write the manifest: {msg}", str(path))
    return OSError(errno.EIO, f"manifest error: {msg}", str(path))


def _check_place_names(groups, done: dict, src_id: str, mpath: Path) -> None:
    """A place of this source must not have the name of a place ingested from another."""
    for g in groups:
        owner = done.get(g.name)
        if owner is not None and owner != src_id:
            raise IngestConflictError(
                f"{mpath}: place {g.name!r} of {src_id} has the name of a place already "
                f"ingested from {owner}; ingest the two sources into separate folders",
                field="src",
            )


def _check_plan(plan, stored: dict | None, mpath: Path) -> dict:
    """The plan as recorded in the manifest; an error when it differs from the stored one."""
    rec = dataclasses.asdict(plan) | {"modalities": list(plan.modalities)}
    if stored is not None and stored != rec:
        diff = [k for k in rec if stored.get(k) != rec[k]]
        raise IngestConflictError(
            f"{mpath}: the sources give another plan than the ingest there ({diff[0]}: "
            f"{stored.get(diff[0])!r} there, {rec[diff[0]]!r} here); "
            "overwrite=true to start afresh",
            field="src",
        )
    return rec


def _check_settings(stored: dict, cfg: IngestConfig, mpath: Path) -> None:
    asked = json.loads(json.dumps(cfg.content()))
    # A setting added after a manifest was written counts as its default there.
    defaults = json.loads(json.dumps(IngestConfig().content()))
    diff = [k for k in asked if stored.get(k, defaults[k]) != asked[k]]
    if diff:
        k = diff[0]
        more = f" (also {', '.join(diff[1:])})" if diff[1:] else ""
        raise IngestConflictError(
            f"{mpath} holds an ingest made with other settings: {k}={stored.get(k)!r} there, "
            f"{k}={asked[k]!r} here{more}; use the same settings to resume or add to it, or "
            "overwrite=true to start afresh",
            field=k,
        )


def _check_source(sources: list[str], src_id: str, cfg: IngestConfig, mpath: Path) -> None:
    known = {str(Path(s).resolve()) for s in sources}
    if not known or src_id in known or cfg.mode == "append":
        return
    raise IngestConflictError(
        f"{mpath} holds the ingest of {', '.join(sorted(known))}, not of {src_id}; pass "
        "mode=append to add this source's places to it, or overwrite=true to start afresh",
        field="src",
    )


def _merged_normalisation(stored: dict | None, new: dict, mpath: Path) -> dict:
    out = dict(stored or {})
    for m, rec in new.items():
        old = out.get(m)
        if old is None:
            out[m] = rec
        elif (old["mean"], old["std"]) != (rec["mean"], rec["std"]):
            raise IngestConflictError(
                f"{mpath}: sensors {rec['sensors']} of modality {m!r} have other normalisation "
                f"statistics than the ingest's {old['sensors']}; ingest them into another folder",
                field="sensors",
            )
        else:
            out[m] = {**old, "sensors": sorted(set(old["sensors"]) | set(rec["sensors"]))}
    return out


def _ingest(src: Path, dst: Path, cfg: IngestConfig, progress: bool, on_shard) -> IngestReport:
    mpath = dst / FILENAME
    src_id = str(src.resolve())
    if cfg.overwrite:
        mpath.unlink(missing_ok=True)
        shutil.rmtree(dst / SHARD_DIR, ignore_errors=True)
    remove_temporaries(dst)
    writer = ManifestWriter(mpath)
    report = IngestReport(manifest=mpath)
    try:
        stored = writer.get_meta("config")
        sources = writer.get_meta("sources") or [
            s for s in [writer.get_meta("source")] if s is not None
        ]
        if stored is not None:
            _check_settings(stored, cfg, mpath)
            _check_source(sources, src_id, cfg, mpath)
        bad: list[tuple[str, str]] = []
        groups = discover(src, cfg, bad)
        done = writer.done_groups()
        _check_place_names(groups, done, src_id, mpath)
        complete = bool(writer.get_meta("complete"))
        if not groups:
            writer.forget_bad_files(done)
            writer.add_bad_files(_once(bad))
            report.bad_files = writer.bad_files()
            if complete and writer.n_samples():
                return _finish_report(report, writer, resumed=True)
            raise _bad_input(src, "no usable place found", bad, report)
        plan = make_plan(groups, cfg)
        plan_rec = _check_plan(plan, writer.get_meta("plan"), mpath)
        normalisation = _merged_normalisation(
            writer.get_meta("normalization"), sensor_normalisation(groups), mpath
        )
        label_map, class_order = read_labels(src if src.is_dir() else src.parent, cfg)
        labels, splits, kind, classes = labels_and_splits(groups, label_map, class_order, cfg)
        stored_classes = writer.classes()
        if stored_classes and classes != stored_classes:
            raise IngestConflictError(
                f"{mpath}: the labels of {src_id} give classes {classes}, the ingest there has "
                f"{stored_classes}; ingest them into separate folders",
                field="labels_file",
            )
        # Every check passed: from here on DST changes. A committed place whose sources changed
        # (a bad file repaired or replaced, a file added) is redone: its samples are forgotten
        # (the manifest marked unfinished in the same transaction) and it is aligned again.
        changed = writer.changed_places(groups)
        if changed:
            n = writer.drop_places(changed)
            log.info("redoing %d place(s) whose files changed (%d samples)", len(changed), n)
            done = writer.done_groups()
            complete = False
            report.n_places_redone = len(changed)
        writer.forget_bad_files(done)
        todo = [g for g in groups if g.name not in done]
        report.n_places = len(groups)
        report.n_places_skipped = len(groups) - len(todo)
        if not todo and complete:
            writer.add_bad_files(_once(bad))
            report.bad_files = writer.bad_files()
            log.info(
                "%s is complete already (%d samples); nothing to do", mpath, writer.n_samples()
            )
            return _finish_report(report, writer, resumed=True)
        if src_id not in {str(Path(s).resolve()) for s in sources}:
            sources = [*sources, src_id]
        writer.set_meta(
            version=VERSION,
            config=cfg.content(),
            plan=plan_rec,
            complete=False,
            source=sources[0],
            sources=sources,
        )
        writer.set_classes(classes)
        writer.add_bad_files(_once(bad))
        clean_partial(dst, writer.n_shards())
        skip = writer.committed_tiles(g.name for g in todo)
        report.resumed = bool(done) or bool(skip)
        _write_places(writer, dst, todo, plan, cfg, splits, labels, src_id, skip, report,
                      progress, on_shard)  # fmt: skip
        report.bad_files = writer.bad_files()
        if writer.n_samples() == 0:
            raise _bad_input(
                src, "no tile with valid pixels in any place", report.bad_files, report
            )
        writer.finalise(
            normalization=normalisation,
            modalities=list(plan.modalities),
            tile_size=plan.tile_size,
            gsd=plan.gsd,
            hr_ratio=plan.hr_ratio,
            hr_only=plan.hr_only,
            label_kind=kind,
        )
        return _finish_report(report, writer, resumed=report.resumed)
    finally:
        writer.close()


def _write_places(
    writer: ManifestWriter,
    dst: Path,
    todo: list,
    plan,
    cfg: IngestConfig,
    splits: dict,
    labels: dict,
    src_id: str,
    skip,
    report: IngestReport,
    progress: bool,
    on_shard,
) -> None:
    """Align the places ``todo`` (in this process, a process pool or on Dask workers) and stream
    their tiles into shards, committing each place with its tiles; a place without a tile
    because of bad files is left for the next run. ``skip``: tiles committed by an interrupted
    run (not written again)."""
    spec = cluster_spec(cfg.cluster, cfg.workers)
    with contextlib.ExitStack() as stack:
        dask = None
        if spec is not None and len(todo) > 0:
            dask = stack.enter_context(DaskPlaces(spec, gdal_options(), cfg.worker_memory))
        stream = ShardStream(writer, dst, plan, cfg, on_shard, write=dask.write if dask else None)
        stack.callback(stream.discard)  # spill files of an ingest that stops early
        results = _run_places(todo, plan, cfg, splits, labels, dst / SPILL_DIR, dask)
        if progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, pipes, tests).
            results = tqdm(
                results,
                total=len(todo),
                desc="ingest",
                unit="place",
                leave=False,
                disable=None,
            )
        for res in results:
            try:
                writer.add_bad_files(_once(res.bad), grp=res.name)
                report.n_tiles_dropped += res.n_dropped
                res.row["src"] = src_id
                refs = res.tile_refs(skip) if res.n_tiles else []
                for j, _ in refs:
                    stream.add(res, j)
                if res.n_tiles or not res.bad:
                    # the stream removes the spill file once the tiles are committed
                    stream.place_done(res.row, res)
                else:
                    # A place without a tile because of bad files is not recorded as
                    # done: the next run examines it again (a fixed file is picked up).
                    res.discard()
            except BaseException:
                res.discard()
                raise
        stream.close()


def _bad_input(src: Path, what: str, bad: list, report: IngestReport) -> BadInputError:
    """``what``, with the first three bad files (path: reason) and how many more; the report
    rides along for the command line's summary."""
    more = len(bad) - 3
    err = BadInputError(
        src,
        f"{what}: "
        + "; ".join(f"{p}: {r}" for p, r in bad[:3])
        + (f" (and {more} more bad files)" if more > 0 else ""),
    )
    err.report = report
    return err


def _finish_report(report: IngestReport, writer: ManifestWriter, resumed: bool) -> IngestReport:
    report.bad_files = writer.bad_files()
    report.n_samples, report.n_shards = writer.n_samples(), writer.n_shards()
    report.resumed = resumed
    return report


__all__ = [
    "CHANNELS",
    "LOCK_NAME",
    "MODALITY_ORDER",
    "MODEL_BANDS",
    "STORE_DTYPES",
    "IngestConfig",
    "IngestConflictError",
    "IngestLockedError",
    "IngestReport",
    "Plan",
    "PlaceResult",
    "Sources",
    "align_place",
    "ingest",
    "make_plan",
    "place_grid",
    "read_acquisition",
    "sensor_normalisation",
    "tile_blocks",
    "to_store",
]

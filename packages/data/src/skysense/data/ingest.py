"""Ingest: a folder of GeoTIFFs -> aligned, masked tiles in shards + a SQLite manifest.

``ingest(src, dst, IngestConfig(...))`` (the ``skysense ingest SRC DST`` command):

1. **Discover** (:mod:`skysense.data.discover`): sensor, band, date and place of every file;
   bad files are reported and left out.
2. **Align** each place: pick its CRS (the reference sensor's when it is metric, else the UTM
   zone of its centre), a Sentinel grid of ``gsd`` metres over the footprint shared by its
   sensors, and the HR grid (same footprint, ``hr_ratio`` HR pixels per Sentinel pixel). Every
   band of every acquisition is warped onto it (20/60 m bands resampled to 10 m, other CRSs
   reprojected), with validity masks (nodata) and cloud masks where given.
3. **Tile**: ``tile_size`` x ``tile_size`` Sentinel pixels (paper: 64 at 10 m) with the
   matching HR tile, spread evenly so they cover the place; each tile gets its centre's
   latitude and longitude, per-step dates and a usable flag (share of clear valid pixels >=
   ``min_valid_fraction``). Tiles without any valid pixel are dropped.
4. **Write** shards (:mod:`skysense.data.shards`) and commit their rows to the manifest
   (:mod:`skysense.data.manifest`) in one transaction each; per-band statistics at the end.

Resumable: a rerun skips the places already committed and rewrites anything after them; a
shard folder is renamed into place only when whole.

Memory: warps run in full-width row blocks of at most ``block_pixels`` per band, but a place's
tiles are kept until the place is committed (a place is the unit of resuming). That is tens of
MB for a patch or a city (OSCD); a whole 110 km Sentinel-2 granule with a long series would not
fit, so cut such scenes into smaller files first. Bad inputs (unreadable or truncated file,
band count or dtype wrong for the sensor, no CRS, no overlap between sensors, place entirely
nodata, unparseable date) are listed in the report and in the manifest's ``bad_files``; the
good files finish.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform as warp_transform

from skysense.data.dates import to_days
from skysense.data.discover import MODALITY_ORDER, Acquisition, Group, discover
from skysense.data.geo import (
    WGS84,
    Grid,
    bounds_in,
    choose_crs,
    intersect,
    is_metric_projected,
    warp,
)
from skysense.data.io import BadInputError, open_raster, read_band
from skysense.data.manifest import FILENAME, VERSION, ManifestWriter
from skysense.data.sensors import SENSORS
from skysense.data.shards import (
    CLEAR,
    HAS_DATA,
    SHARD_DIR,
    STEP_UNUSABLE,
    STEP_USABLE,
    clean_partial,
    pack,
    write_shard,
)

log = logging.getLogger(__name__)

# Band order of each modality in the shards (the model's order).
MODEL_BANDS = {
    m: SENSORS[s].model_bands for m, s in (("hr", "hr_rgb"), ("s2", "s2_l2a"), ("s1", "s1_grd_db"))
}


@dataclass
class IngestConfig:
    """Settings of one ingest (every field is also a ``skysense ingest`` override).

    Attributes:
        tile_size: tile side in Sentinel pixels (paper: 64 at 10 m).
        gsd: Sentinel grid pixel size, metres.
        hr_ratio: HR pixels per Sentinel pixel (paper: 2048 / 64 = 32); None: from the first HR
            file's ground resolution, rounded.
        hr_gsd: HR-only data sets: HR pixel size in metres (None: the first HR file's).
        hr_tile_size: HR-only data sets: tile side in HR pixels.
        crs: "auto" (the reference sensor's CRS when metric, else UTM of the centre), "utm",
            or a CRS string ("EPSG:32631").
        resampling: Sentinel resampling (bilinear keeps reflectances smooth when 20/60 m bands
            go to 10 m); hr_resampling: HR resampling (average when reducing resolution).
        date_pattern: regex (named groups year/month/day or date) or strptime format for dates
            in file names; None: tags, sidecars, then YYYYMMDD / YYYY-MM-DD in names.
        group_pattern: regex with a named group ``group`` on the relative path that names the
            place a file belongs to; None: its folder (acquisition folders skipped).
        sensors: {regex on the relative path: sensor name} rules that override detection.
        s2_default, s1_default: sensor of Sentinel files whose name does not say the level.
        missing_bands: "error" (a missing model band makes the acquisition bad) or "fill"
            (single-polarisation SAR: the missing band is filled with the sensor mean, i.e. 0
            after normalisation, and logged).
        min_valid_fraction: a step is usable when at least this share of its tile is valid
            and clear.
        cloud_probability: threshold (%) for cloud-probability masks (CLD files).
        shard_size: samples per shard (a place's tiles are never split between commits).
        val_fraction, test_fraction, split_seed: split by place (a hash of its name).
        labels_file: CSV with columns group, label[, split] (default: <src>/labels.csv if any;
            labels ``a;b`` are multi-label; <src>/classes.txt orders class names).
        workers: processes that align places in parallel (0: in this process).
        block_pixels: pixels (per band, HR pixels counted) warped at once; bounds memory.
        overwrite: start afresh even if ``dst`` holds a manifest.
    """

    tile_size: int = 64
    gsd: float = 10.0
    hr_ratio: int | None = None
    hr_gsd: float | None = None
    hr_tile_size: int = 256
    crs: str = "auto"
    resampling: str = "bilinear"
    hr_resampling: str = "average"
    date_pattern: str | None = None
    group_pattern: str | None = None
    sensors: dict[str, str] | None = None
    s2_default: str = "s2_l2a"
    s1_default: str = "s1_grd_db"
    missing_bands: str = "error"
    min_valid_fraction: float = 0.05
    cloud_probability: float = 50.0
    shard_size: int = 256
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    labels_file: str | None = None
    workers: int = 0
    block_pixels: int = 1 << 24
    overwrite: bool = False

    def __post_init__(self):
        if self.tile_size < 1 or self.hr_tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.gsd <= 0:
            raise ValueError(f"gsd must be positive, got {self.gsd}")
        if self.missing_bands not in ("error", "fill"):
            raise ValueError(f"missing_bands must be 'error' or 'fill', got {self.missing_bands!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        for s in (self.s2_default, self.s1_default, *(self.sensors or {}).values()):
            if s not in SENSORS:
                raise ValueError(f"unknown sensor {s!r}; registered: {sorted(SENSORS)}")

    # Fields that change the shards' content: a resumed ingest must use the same values.
    CONTENT_FIELDS = (
        "tile_size",
        "gsd",
        "hr_ratio",
        "hr_gsd",
        "hr_tile_size",
        "crs",
        "resampling",
        "hr_resampling",
        "date_pattern",
        "group_pattern",
        "sensors",
        "s2_default",
        "s1_default",
        "missing_bands",
        "min_valid_fraction",
        "cloud_probability",
        "shard_size",
        "val_fraction",
        "test_fraction",
        "split_seed",
    )

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_FIELDS}


@dataclass
class Plan:
    """What every place of one ingest shares."""

    modalities: tuple[str, ...]
    tile_size: int  # base grid pixels
    gsd: float  # base grid pixel size, metres
    hr_ratio: int  # HR pixels per base pixel (1 for HR-only data)
    hr_only: bool


@dataclass
class IngestReport:
    """What an ingest did: counts, the manifest's path and the bad files with their reasons."""

    manifest: Path
    n_samples: int = 0
    n_shards: int = 0
    n_places: int = 0
    n_places_skipped: int = 0
    n_tiles_dropped: int = 0
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return not self.bad_files

    def format(self) -> str:
        lines = [
            f"manifest: {self.manifest}",
            f"samples: {self.n_samples} in {self.n_shards} shard(s) from {self.n_places} "
            f"place(s) ({self.n_places_skipped} already done), {self.n_tiles_dropped} tile(s) "
            f"dropped as entirely nodata, {self.seconds:.1f} s",
        ]
        if self.bad_files:
            lines.append(f"bad files ({len(self.bad_files)}):")
            lines += [f"  {p}: {r}" for p, r in self.bad_files]
        else:
            lines.append("bad files: none")
        return "\n".join(lines)


@dataclass
class GroupResult:
    name: str
    tiles: list[dict]
    bad: list[tuple[str, str]]
    row: dict  # the groups-table row (grid, acquisitions)
    n_dropped: int = 0


# ----------------------------------------------------------------------------------- planning


def _hr_ground_gsd(acq: Acquisition) -> float:
    """Ground pixel size (m) of an HR file, also for geographic or Web Mercator files."""
    with rasterio.open(acq.stack or next(iter(acq.bands.values()))) as ds:
        if is_metric_projected(ds.crs):
            return float(ds.res[0])
        crs = choose_crs(ds.crs, ds.bounds, "utm")
        b = bounds_in(ds.bounds, ds.crs, crs)
        return float((b[2] - b[0]) / ds.width)


CHANNELS = {"hr": 3, "s2": 10, "s1": 2}
STORE_DTYPES = {"hr": "uint8", "s2": "uint16", "s1": "float32"}


def sensor_normalisation(groups: list[Group]) -> dict:
    """{modality: {"sensors", "mean", "std"}}: the spec statistics the loaders normalise with.

    Every sensor feeding a modality must fit the batch contract (its channel count and the
    shards' dtype) and share one set of statistics (Sentinel-2 L1C and L2A do); raises
    ValueError naming the sensors otherwise.
    """
    used: dict[str, set[str]] = {}
    for g in groups:
        for m, acqs in g.acquisitions.items():
            used.setdefault(m, set()).update(a.sensor for a in acqs)
    out = {}
    for m, names in used.items():
        specs = [SENSORS[n] for n in sorted(names)]
        for spec in specs:
            if len(spec.model_bands) != CHANNELS[m] or spec.dtype != STORE_DTYPES[m]:
                raise ValueError(
                    f"sensor {spec.name!r} feeds modality {m!r} with {len(spec.model_bands)} "
                    f"model band(s) of {spec.dtype}; {m!r} takes {CHANNELS[m]} of "
                    f"{STORE_DTYPES[m]}"
                )
        stats = {(tuple(s.mean), tuple(s.std)) for s in specs}
        if len(stats) > 1:
            raise ValueError(
                f"sensors {sorted(names)} of modality {m!r} have different normalisation "
                "statistics; ingest them into separate manifests"
            )
        mean, std = stats.pop()
        out[m] = {"sensors": sorted(names), "mean": list(mean), "std": list(std)}
    return out


def make_plan(groups: list[Group], cfg: IngestConfig) -> Plan:
    mods = tuple(m for m in ("hr", "s2", "s1") if any(g.acquisitions.get(m) for g in groups))
    if not mods:
        raise BadInputError("source", "no usable GeoTIFF found (see the bad files)")
    sensor_normalisation(groups)  # fail early on sensors that do not fit the contract
    first_hr = next((g.acquisitions["hr"][0] for g in groups if g.acquisitions.get("hr")), None)
    if mods == ("hr",):
        gsd = cfg.hr_gsd or round(_hr_ground_gsd(first_hr), 3)
        return Plan(mods, cfg.hr_tile_size, gsd, 1, True)
    ratio = 1
    if "hr" in mods:
        ratio = cfg.hr_ratio or max(1, round(cfg.gsd / _hr_ground_gsd(first_hr)))
        if cfg.tile_size * ratio > 2048:
            log.warning(
                "HR tiles of %d px (tile_size %d x hr_ratio %d): set hr_ratio to bound them",
                cfg.tile_size * ratio,
                cfg.tile_size,
                ratio,
            )
    return Plan(mods, cfg.tile_size, cfg.gsd, ratio, False)


# --------------------------------------------------------------------------------- alignment


class Sources:
    """Open datasets, opened once and closed together (at most ``max_open``; the least recently
    used is closed first)."""

    def __init__(self, max_open: int | None = None):
        self.open: dict[Path, rasterio.io.DatasetReader] = {}
        self.max_open = max_open

    def __call__(self, path: Path):
        path = Path(path)
        if path in self.open:
            self.open[path] = self.open.pop(path)  # most recently used last
        else:
            self.open[path] = open_raster(path)
            if self.max_open is not None and len(self.open) > self.max_open:
                self.open.pop(next(iter(self.open))).close()
        return self.open[path]

    def close(self):
        for ds in self.open.values():
            ds.close()
        self.open.clear()


def read_acquisition(
    acq: Acquisition, grid: Grid, cfg: IngestConfig, src: Sources
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One acquisition on ``grid``: (model bands (C, H, W) float32 NaN=nodata, has_data, clear).

    ``has_data`` (H, W) bool: every band has a value (and the alpha band, if any, is set);
    ``clear`` (H, W) bool: no cloud mask of the acquisition marks the pixel.
    """
    spec = SENSORS[acq.sensor]
    resampling = cfg.hr_resampling if spec.modality == "hr" else cfg.resampling
    bands = []
    for b in spec.model_bands:
        if acq.stack is not None:
            ds, idx = src(acq.stack), acq.stack_bands.index(b) + 1
        elif b in acq.bands:
            ds, idx = src(acq.bands[b]), 1
        else:  # missing_bands = fill (checked in discovery)
            bands.append(None)
            continue
        bands.append(read_band(ds, idx, spec, grid, resampling=resampling))
    shape = grid.shape
    present = [x for x in bands if x is not None]
    if spec.units == "linear":
        present = [spec.to_model_units(x) for x in present]
        it = iter(present)
        bands = [None if x is None else next(it) for x in bands]
    has_data = np.ones(shape, bool)
    for x in present:
        has_data &= np.isfinite(x)
    if acq.stack is not None and "alpha" in acq.stack_bands:
        ds = src(acq.stack)
        alpha = read_band(ds, acq.stack_bands.index("alpha") + 1, spec, grid, resampling="nearest")
        has_data &= alpha > 0
    data = np.stack(
        [np.full(shape, spec.mean[i], np.float32) if x is None else x for i, x in enumerate(bands)]
    )
    clear = np.ones(shape, bool)
    for path, kind in acq.masks:
        # Class codes, not reflectances: no nodata value (SCL's 0 means "no data" below).
        m = warp(src(path), 1, grid, resampling="nearest", src_nodata=None)
        if kind == "binary":
            clear &= ~(m > 0)
        elif kind == "scl":
            clear &= ~np.isin(m, (3, 8, 9, 10))
            has_data &= ~np.isin(m, (0, 1))
        else:
            clear &= ~(m >= cfg.cloud_probability)
    return data, has_data, clear


def to_store(modality: str, data: np.ndarray, has_data: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 -> the shard dtype, channels last, no-data pixels set to the fill."""
    if modality == "s1":
        out = np.where(has_data[None], data, np.nan).astype(np.float32)
    else:
        hi = 255 if modality == "hr" else 65535
        out = np.clip(np.rint(np.nan_to_num(data)), 0, hi)
        out = np.where(has_data[None], out, 0).astype(np.uint8 if modality == "hr" else np.uint16)
    return np.moveaxis(out, 0, -1)


def _starts(n: int, tile: int) -> list[int]:
    """Tile origins that cover ``n`` pixels with tiles of ``tile``, evenly spread."""
    if n <= tile:
        return [0]
    k = math.ceil(n / tile)
    return [int(round(x)) for x in np.linspace(0, n - tile, k)]


def _blocks(rows: list[int], tile: int, row_pixels: int, budget: int):
    """Group tile rows into blocks of source rows warped at once: (first, end, tile rows).

    One warp per block and acquisition band: few, large warps are much faster than one per
    tile row, and the pixel budget bounds memory on scenes of any size.
    """
    out, cur = [], []
    for r in rows:
        if cur and (r + tile - cur[0]) * row_pixels > budget:
            out.append((cur[0], cur[-1] + tile, cur))
            cur = []
        cur.append(r)
    if cur:
        out.append((cur[0], cur[-1] + tile, cur))
    return out


def _place_grid(group: Group, plan: Plan, cfg: IngestConfig, src: Sources, bad: list):
    """(grid, CRS) of a place, dropping sensors whose footprints miss the reference's."""
    ref = group.modalities[0]
    a0 = group.acquisitions[ref][0]
    ds0 = src(a0.stack or next(iter(a0.bands.values())))
    crs = choose_crs(ds0.crs, ds0.bounds, cfg.crs)
    foot = None
    origin = None
    for m in group.modalities:
        union = None
        for a in group.acquisitions[m]:
            for f in [a.stack] if a.stack else list(a.bands.values()):
                ds = src(f)
                b = bounds_in(ds.bounds, ds.crs, crs)
                union = (
                    b
                    if union is None
                    else (
                        min(union[0], b[0]),
                        min(union[1], b[1]),
                        max(union[2], b[2]),
                        max(union[3], b[3]),
                    )
                )
                if origin is None and ds.crs == crs and abs(ds.res[0] - plan.gsd) < 1e-6:
                    origin = (ds.transform.c, ds.transform.f)
        new = union if foot is None else intersect(foot, union)
        if new is None or min(new[2] - new[0], new[3] - new[1]) < plan.gsd:
            for f in group.files:
                if any(f in a.files for a in group.acquisitions[m]):
                    bad.append(
                        (
                            str(f),
                            f"no overlap between sensors: the {m} footprint of place "
                            f"{group.name!r} does not overlap its {ref} footprint",
                        )
                    )
            group.acquisitions[m] = []
            continue
        foot = new
    grid = Grid.from_bounds(foot, crs, plan.gsd, origin=origin)
    # A place smaller than one tile gets a whole tile, centred, the rest marked nodata.
    grow_h, grow_w = max(0, plan.tile_size - grid.height), max(0, plan.tile_size - grid.width)
    if grow_h or grow_w:
        grid = Grid(
            crs,
            grid.transform @ rasterio.Affine.translation(-(grow_w // 2), -(grow_h // 2)),
            grid.height + grow_h,
            grid.width + grow_w,
        )
    return grid


def align_place(
    group: Group, plan: Plan, cfg: IngestConfig, split: str, label: tuple
) -> GroupResult:
    """Warp, mask and tile one place; never raises for bad files (they go to ``bad``)."""
    bad: list[tuple[str, str]] = []
    src = Sources()
    try:
        # An acquisition whose file fails while being read is dropped and the place redone
        # without it; every round removes one, so this ends.
        while True:
            try:
                return _align_place(group, plan, cfg, split, label, src, bad)
            except _AcquisitionFailed as e:
                bad.append((str(e.path), f"unreadable or truncated: {e.reason}"))
                for m, acqs in group.acquisitions.items():
                    group.acquisitions[m] = [a for a in acqs if a is not e.acq]
                src.close()
    finally:
        src.close()


class _AcquisitionFailed(Exception):
    def __init__(self, acq, path, reason):
        super().__init__(reason)
        self.acq, self.path, self.reason = acq, path, reason


def _align_place(group, plan, cfg, split, label, src, bad) -> GroupResult:
    group_row = {
        "grp": group.name,
        "crs": None,
        "transform": None,
        "height": 0,
        "width": 0,
        "hr_ratio": plan.hr_ratio,
        "n_tiles": 0,
        "acquisitions": [],
    }
    if not group.modalities:
        return GroupResult(group.name, [], bad, group_row)
    try:
        grid = _place_grid(group, plan, cfg, src, bad)
    except BadInputError as e:
        bad.append((e.path, e.reason))
        return GroupResult(group.name, [], bad, group_row)
    mods = [m for m in group.modalities if group.acquisitions.get(m)]
    T = plan.tile_size
    rows, cols = _starts(grid.height, T), _starts(grid.width, T)
    # tiles[(r, c)][m] = list over steps of (data, mask) for series; hr likewise with one step
    per_tile: dict[tuple[int, int], dict[str, list]] = {
        (r, c): {m: [] for m in mods} for r in rows for c in cols
    }
    valid_total = {m: np.zeros(len(group.acquisitions[m]), np.int64) for m in mods}
    for b0, b1, block_rows in _blocks(rows, T, grid.width * plan.hr_ratio**2, cfg.block_pixels):
        block = grid.window(b0, 0, b1 - b0, grid.width)
        for m in mods:
            ratio = plan.hr_ratio if (m == "hr" and not plan.hr_only) else 1
            bgrid = block.scaled(ratio) if ratio > 1 else block
            for k, acq in enumerate(group.acquisitions[m]):
                try:
                    data, has_data, clear = read_acquisition(acq, bgrid, cfg, src)
                except BadInputError as e:
                    raise _AcquisitionFailed(acq, e.path, e.reason) from None
                except Exception as e:  # noqa: BLE001 - GDAL read errors of damaged files
                    raise _AcquisitionFailed(
                        acq, acq.files[0], f"{type(e).__name__}: {e}"
                    ) from None
                valid_total[m][k] += int(has_data.sum())
                stored = to_store(m, data, has_data)
                # "clear" says something only where there is data.
                mask = (
                    has_data.astype(np.uint8) * HAS_DATA
                    + (clear & has_data).astype(np.uint8) * CLEAR
                )
                for r in block_rows:
                    rs = slice((r - b0) * ratio, (r - b0 + T) * ratio)
                    for c in cols:
                        cs = slice(c * ratio, (c + T) * ratio)
                        per_tile[(r, c)][m].append((stored[rs, cs], mask[rs, cs]))
    # Acquisitions without a single valid pixel over the whole place are bad input.
    keep = {}
    for m in mods:
        keep[m] = []
        for k, acq in enumerate(group.acquisitions[m]):
            if valid_total[m][k] == 0:
                for f in acq.files:
                    bad.append((str(f), f"entirely nodata over place {group.name!r}"))
            else:
                keep[m].append(k)
    # Each acquisition's step index in the place's series (what the manifest's acquisitions
    # table and the tiles' dates refer to).
    for m in mods:
        for step, k in enumerate(keep[m]):
            a = group.acquisitions[m][k]
            group_row["acquisitions"].append(
                {
                    "modality": m,
                    "step": step,
                    "sensor": a.sensor,
                    "days": to_days(a.date) if a.date else None,
                    "files": json.dumps(a.describe()),
                }
            )
    group_row.update(
        crs=grid.crs.to_string(),
        transform=list(grid.transform)[:6],
        height=grid.height,
        width=grid.width,
    )
    centres = [(r, c) for r in rows for c in cols]
    xs, ys = zip(*[grid.transform @ (c + T / 2.0, r + T / 2.0) for r, c in centres])
    lons, lats = warp_transform(grid.crs, WGS84, list(xs), list(ys))
    tiles, dropped = [], 0
    for i, (r, c) in enumerate(centres):
        rec: dict = {}
        any_valid = False
        for m in mods:
            steps = [per_tile[(r, c)][m][k] for k in keep[m]]
            if not steps:
                continue
            data = np.stack([s[0] for s in steps])
            mask = np.stack([s[1] for s in steps])
            full = mask == (HAS_DATA | CLEAR)
            frac = full.reshape(len(steps), -1).mean(axis=1)
            usable = (frac >= cfg.min_valid_fraction) & (frac > 0)
            any_valid |= bool((mask & HAS_DATA).any())
            days = np.array(
                [
                    to_days(group.acquisitions[m][k].date) if group.acquisitions[m][k].date else 0
                    for k in keep[m]
                ],
                np.int32,
            )
            step = np.where(usable, STEP_USABLE, STEP_UNUSABLE).astype(np.uint8)
            if m == "hr":
                # One HR image per sample: the first usable one (the series holds one normally).
                j = int(np.argmax(usable)) if usable.any() else 0
                rec[m] = {"data": data[j], "mask": mask[j], "days": days[j], "step": step[j]}
            else:
                rec[m] = {"data": data, "mask": mask, "days": days, "step": step}
        if not any_valid:
            dropped += 1
            continue
        tgrid = grid.window(r, c, T, T)
        rec.update(
            name=f"{group.name}/r{r}c{c}",
            grp=group.name,
            row=r,
            col=c,
            crs=grid.crs.to_string(),
            bounds=tgrid.bounds,
            lat=float(lats[i]),
            lon=float(lons[i]),
            split=split,
            label=label,
        )
        tiles.append(rec)
    if not tiles:
        for f in group.files:
            bad.append((str(f), f"every tile of place {group.name!r} is entirely nodata"))
    group_row["n_tiles"] = len(tiles)
    return GroupResult(group.name, tiles, bad, group_row, dropped)


# ---------------------------------------------------------------------------- labels, splits


def _read_labels(src: Path, cfg: IngestConfig) -> tuple[dict, list[str] | None]:
    """{group or key: (labels list, split or None)} from the labels CSV, and the class order."""
    path = Path(cfg.labels_file) if cfg.labels_file else (src / "labels.csv")
    out = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if "group" not in row or "label" not in row:
                    raise ValueError(f"{path}: needs columns group, label (got {list(row)})")
                labs = [x for x in row["label"].split(";") if x != ""]
                out[row["group"]] = (labs, row.get("split") or None)
    elif cfg.labels_file:
        raise FileNotFoundError(f"labels_file {path} not found")
    classes = None
    cpath = path.parent / "classes.txt"
    if cpath.is_file():
        classes = [ln.strip() for ln in cpath.read_text().splitlines() if ln.strip()]
    return out, classes


def _split(name: str, cfg: IngestConfig) -> str:
    h = int(hashlib.sha1(f"{cfg.split_seed}:{name}".encode()).hexdigest()[:8], 16) / 2**32
    if h < cfg.val_fraction:
        return "val"
    if h < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


# --------------------------------------------------------------------------------- the driver


def _run_places(groups, plan, cfg, splits, labels) -> Iterator[GroupResult]:
    args = [(g, plan, cfg, splits[g.name], labels[g.name]) for g in groups]
    if cfg.workers and cfg.workers > 0 and len(groups) > 1:
        from concurrent.futures import ProcessPoolExecutor

        window = 4 * cfg.workers
        with ProcessPoolExecutor(cfg.workers) as ex:
            pending = []
            for a in args:
                pending.append(ex.submit(align_place, *a))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            for p in pending:
                yield p.result()
    else:
        for a in args:
            yield align_place(*a)


def _stats(arrays: dict, modalities) -> list[tuple]:
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
    the same ``dst`` resumes: places already committed are skipped; a complete manifest is
    left as it is (pass ``overwrite=True`` to redo it). ``on_shard(i)`` is called after shard
    ``i`` is committed (progress hooks, tests). Returns an :class:`IngestReport`; bad files do
    not raise, they are in ``report.bad_files``.
    """
    cfg = dataclasses.replace(cfg or IngestConfig(), **overrides)
    # One GDAL environment for the whole run (rasterio otherwise sets one up per call), and no
    # directory listing on open: folders of per-band files hold many files.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        return _ingest(src, dst, cfg, progress, on_shard)


def _ingest(src, dst, cfg: IngestConfig, progress: bool, on_shard) -> IngestReport:
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    mpath = dst / FILENAME
    if cfg.overwrite:
        mpath.unlink(missing_ok=True)
        shutil.rmtree(dst / SHARD_DIR, ignore_errors=True)
    writer = ManifestWriter(mpath)
    report = IngestReport(manifest=mpath)
    try:
        stored = writer.get_meta("config")
        if stored is not None and stored != json.loads(json.dumps(cfg.content())):
            diff = {k: (stored.get(k), v) for k, v in cfg.content().items() if stored.get(k) != v}
            raise ValueError(
                f"{dst} holds an ingest made with other settings {diff} (stored, asked); "
                "pass overwrite=true to start afresh"
            )
        if writer.get_meta("complete"):
            report.n_samples, report.n_shards = writer.n_samples(), writer.n_shards()
            report.bad_files = writer.db.execute("SELECT path, reason FROM bad_files").fetchall()
            report.resumed = True
            log.info("%s is complete already (%d samples); nothing to do", mpath, report.n_samples)
            return report
        bad: list[tuple[str, str]] = []
        groups = discover(src, cfg, bad)
        if not groups:
            writer.add_bad_files(bad)
            report.bad_files = bad
            raise BadInputError(
                src, "no usable place found: " + "; ".join(f"{p}: {r}" for p, r in bad[:5])
            )
        plan = make_plan(groups, cfg)
        normalisation = sensor_normalisation(groups)
        stored_plan = writer.get_meta("plan")
        if stored_plan is not None and stored_plan != dataclasses.asdict(plan) | {
            "modalities": list(plan.modalities)
        }:
            raise ValueError(
                f"{dst}: the sources changed since the interrupted ingest; overwrite=true"
            )
        label_map, class_order = _read_labels(src if src.is_dir() else src.parent, cfg)
        labels, splits, kind, classes = _labels_and_splits(groups, label_map, class_order, cfg)
        writer.set_meta(
            version=VERSION,
            config=cfg.content(),
            plan=dataclasses.asdict(plan) | {"modalities": list(plan.modalities)},
            complete=False,
            source=str(src),
        )
        writer.set_classes(classes)
        done = writer.done_groups()
        report.resumed = bool(done)
        n_shards = writer.n_shards()
        clean_partial(dst, n_shards)
        n_samples = writer.n_samples()
        todo = [g for g in groups if g.name not in done]
        report.n_places_skipped = len(groups) - len(todo)
        report.n_places = len(groups)
        buffer: list[dict] = []
        buffer_groups: list[dict] = []

        def flush():
            nonlocal n_shards, n_samples
            if not buffer:
                return
            k = math.ceil(len(buffer) / cfg.shard_size)  # no shard above shard_size
            parts = np.array_split(np.arange(len(buffer)), k)
            shards, sample_rows, stats = [], [], []
            for part in parts:
                tiles = [buffer[i] for i in part]
                arrays = pack(tiles, plan.modalities)
                rel = write_shard(dst, n_shards, arrays)
                steps = {m: int(arrays[f"{m}_step"].shape[1]) for m in plan.modalities if m != "hr"}
                shards.append(
                    {"id": n_shards, "path": rel.as_posix(), "n": len(tiles), "steps": steps}
                )
                stats.append(_stats(arrays, plan.modalities))
                for off, t in enumerate(tiles):
                    sample_rows.append(_sample_row(n_samples, n_shards, off, t, plan.modalities))
                    n_samples += 1
                n_shards += 1
            # All shards of this flush and the places they complete: one transaction.
            writer.commit(
                [
                    (s, [r for r in sample_rows if r["shard"] == s["id"]], st)
                    for s, st in zip(shards, stats)
                ],
                buffer_groups,
            )
            for s in shards:
                if on_shard is not None:
                    on_shard(s["id"])
            buffer.clear()
            buffer_groups.clear()

        results = _run_places(todo, plan, cfg, splits, labels)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(todo), desc="ingest", unit="place", leave=False)
        for res in results:
            bad.extend(res.bad)
            report.n_tiles_dropped += res.n_dropped
            if not res.tiles:
                writer.commit_groups_without_tiles([res.row])
                continue
            buffer.extend(res.tiles)
            buffer_groups.append(res.row)
            if len(buffer) >= cfg.shard_size:
                flush()
        flush()
        writer.add_bad_files(bad)
        if writer.n_samples() == 0:
            raise BadInputError(src, "no tile with valid pixels in any place (see the bad files)")
        writer.finalise(
            normalization=normalisation,
            modalities=list(plan.modalities),
            tile_size=plan.tile_size,
            gsd=plan.gsd,
            hr_ratio=plan.hr_ratio,
            hr_only=plan.hr_only,
            label_kind=kind,
        )
        report.bad_files = writer.db.execute("SELECT path, reason FROM bad_files").fetchall()
        report.n_samples, report.n_shards = writer.n_samples(), writer.n_shards()
    finally:
        writer.close()
        report.seconds = time.perf_counter() - t0
    log.info(
        "ingest: %d samples, %d shards, %d bad file(s) in %.1f s",
        report.n_samples,
        report.n_shards,
        len(report.bad_files),
        report.seconds,
    )
    return report


def _labels_and_splits(groups, label_map, class_order, cfg):
    """Per place: (label indices,) and split; the label kind and the class names."""
    raw = {}
    for g in groups:
        entry = label_map.get(g.name) or label_map.get(g.key)
        if entry is not None:
            raw[g.name] = (entry[0], entry[1])
        elif g.labels is not None:
            raw[g.name] = (g.labels, None)
        else:
            raw[g.name] = ([], None)
    names = sorted({x for labs, _ in raw.values() for x in labs})
    multi = any(len(labs) > 1 for labs, _ in raw.values()) or any(g.labels for g in groups)
    kind = "none" if not names else ("multi" if multi else "single")
    if class_order:
        unknown = set(names) - set(class_order)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not in classes.txt")
        classes = class_order
    elif names and all(n.lstrip("-").isdigit() for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
    else:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    labels = {n: tuple(index[x] for x in labs) for n, (labs, _) in raw.items()}
    splits = {n: sp or _split(n, cfg) for n, (_, sp) in raw.items()}
    return labels, splits, kind, classes


def _sample_row(sid: int, shard: int, offset: int, t: dict, modalities) -> dict:
    from skysense.data.dates import from_days

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
    for m in ("hr", "s2", "s1"):
        if m in modalities and t.get(m) is not None:
            days = np.atleast_1d(t[m]["days"])
            step = np.atleast_1d(t[m]["step"])
            row[f"{m}_dates"] = ",".join(from_days(d).isoformat() if d else "" for d in days)
            row[f"{m}_valid"] = "".join("1" if s == STEP_USABLE else "0" for s in step)
        else:
            row[f"{m}_dates"], row[f"{m}_valid"] = None, None
    return row


__all__ = [
    "IngestConfig",
    "IngestReport",
    "MODALITY_ORDER",
    "Sources",
    "align_place",
    "ingest",
    "make_plan",
    "read_acquisition",
    "to_store",
]

"""Ingest, alignment: one place's sources warped onto its grid, masked and cut into tiles.

:func:`align_place` picks the place's grid (:func:`place_grid`: the reference sensor's CRS
when metric, else the UTM zone of its centre; a Sentinel grid of ``gsd`` metres over the
footprint its sensors share; the HR grid on the same footprint, ``hr_ratio`` HR pixels per
Sentinel pixel), warps every band of every acquisition onto it (20/60 m bands resampled to
10 m, other CRSs reprojected) with validity masks (nodata, NaN) and cloud masks, and cuts it
into ``tile_size`` tiles spread evenly over the place.

Memory is bounded by construction: the place is read in blocks of whole tiles (rows and
columns) of about ``block_pixels`` pixels per band (:func:`tile_blocks`), one acquisition at a
time (windowed reads: only the part of a file under the block is read), and each block's
tile pieces that hold data go to a spill file on disk before the next block is read. Only
small per-tile indexes stay in memory, so peak memory follows the block and the series
length, not the size of the place. After the last block the acquisitions without a single
valid pixel over the place are known (they are bad input); :meth:`PlaceResult.tiles` then
reads the tiles back one at a time, in row-major order, for the shard writer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform as warp_transform

from skysense.data.dates import to_days
from skysense.data.discover import Acquisition, Group
from skysense.data.geo import WGS84, Grid, bounds_in, choose_crs, intersect, warp
from skysense.data.ingest_plan import CHANNELS, IngestConfig, Plan
from skysense.data.io import BadInputError, open_raster, read_band
from skysense.data.sensors import SENSORS
from skysense.data.shards import (
    CLEAR,
    FILL,
    HAS_DATA,
    STEP_UNUSABLE,
    STEP_USABLE,
    STORE_DTYPE,
)


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


def place_grid(group: Group, plan: Plan, cfg: IngestConfig, src: Sources, bad: list):
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


def _groups(starts: list[int], tile: int, max_span: int) -> list[list[int]]:
    """Consecutive tile origins grouped so that each group spans at most ``max_span`` pixels
    (a group holds at least one tile)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for s in starts:
        if cur and s + tile - cur[0] > max_span:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    return out


def tile_blocks(
    rows: list[int], cols: list[int], tile: int, ratio: int, budget: int
) -> list[tuple[list[int], list[int]]]:
    """Blocks of whole tiles read at once: ``(tile rows, tile columns)``, row-major.

    A block covers at most ``budget`` pixels per band, counted on the finest grid (``ratio``
    HR pixels per base pixel), or one tile when a tile alone is larger: memory follows the
    budget whatever the size of the place. Few, large warps are much faster than one per tile.
    """
    px = max(1, budget // (ratio * ratio))  # base-grid pixels per block
    col_groups = _groups(cols, tile, max(tile, px // tile))
    width = max(g[-1] + tile - g[0] for g in col_groups)
    row_groups = _groups(rows, tile, max(tile, px // width))
    return [(rg, cg) for rg in row_groups for cg in col_groups]


@dataclass
class PlaceResult:
    """One aligned place: its bad files, its groups-table row and its tiles (in a spill file).

    ``offsets[m]`` (n_tiles, n_acq) int64: byte offset in the spill file of the piece of tile
    ``i`` (row-major over ``rows`` x ``cols``) and acquisition ``k``, -1 where the piece holds
    no data (it reads back as the fill value with a zero mask). ``keep[m]``: the acquisitions
    with at least one valid pixel over the place, in series order.
    """

    name: str
    bad: list[tuple[str, str]]
    row: dict  # the groups-table row (grid, acquisitions)
    n_dropped: int = 0
    spill: str | None = None
    grid: Grid | None = None
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    tile: int = 0
    sides: dict = field(default_factory=dict)  # modality -> tile side in its pixels
    offsets: dict = field(default_factory=dict)
    keep: dict = field(default_factory=dict)
    days: dict = field(default_factory=dict)  # modality -> (n_acq,) int32 days since 1970
    valid: list[int] = field(default_factory=list)  # tile indices with any valid pixel
    latlon: np.ndarray | None = None  # (n_valid, 2) float64
    split: str = "train"
    label: tuple = ()
    min_valid_fraction: float = 0.05

    @property
    def n_tiles(self) -> int:
        return len(self.valid)

    def discard(self) -> None:
        """Remove the spill file (the tiles are in shards, or the place is given up)."""
        if self.spill:
            Path(self.spill).unlink(missing_ok=True)

    def _piece(self, f, m: str, i: int, k: int):
        side, C = self.sides[m], CHANNELS[m]
        off = int(self.offsets[m][i, k])
        dtype = np.dtype(STORE_DTYPE[m])
        if off < 0:
            return np.full((side, side, C), FILL[m], dtype), np.zeros((side, side), np.uint8)
        f.seek(off)
        n = side * side * C * dtype.itemsize
        buf = f.read(n + side * side)
        if len(buf) != n + side * side:
            raise OSError(f"spill file {self.spill}: short read (was it removed?)")
        data = np.frombuffer(buf[:n], dtype).reshape(side, side, C)
        mask = np.frombuffer(buf[n:], np.uint8).reshape(side, side)
        return data, mask

    def tile_name(self, j: int) -> str:
        """Name of the place's ``j``-th valid tile (``<place>/r<row>c<col>``)."""
        i, ncols = self.valid[j], len(self.cols)
        return f"{self.name}/r{self.rows[i // ncols]}c{self.cols[i % ncols]}"

    def tile_refs(self, skip: set[str] = frozenset()) -> list[tuple[int, str]]:
        """``(j, name)`` of the place's tiles, row-major; names in ``skip`` are left out (tiles
        of this place already committed by an interrupted run). Nothing is read."""
        refs = [(j, self.tile_name(j)) for j in range(len(self.valid))]
        return [(j, n) for j, n in refs if n not in skip]

    def read_tiles(self, js) -> list[dict]:
        """The tile records of valid tiles ``js`` (indices into ``valid``), read from the spill
        file (see :func:`skysense.data.shards.pack` for a record's fields)."""
        with open(self.spill, "rb") as f:
            return [self._record(f, j) for j in js]

    def tiles(self, skip: set[str] = frozenset()) -> Iterator[dict]:
        """The place's tile records, one at a time, row-major; names in ``skip`` are left out."""
        if not self.valid:
            return
        with open(self.spill, "rb") as f:
            for j, _ in self.tile_refs(skip):
                yield self._record(f, j)

    def _record(self, f, j: int) -> dict:
        T = self.tile
        ncols = len(self.cols)
        i = self.valid[j]
        r, c = self.rows[i // ncols], self.cols[i % ncols]
        rec: dict = {}
        for m, keep in self.keep.items():
            if not keep:
                continue
            pieces = [self._piece(f, m, i, k) for k in keep]
            data = np.stack([p[0] for p in pieces])
            mask = np.stack([p[1] for p in pieces])
            full = mask == (HAS_DATA | CLEAR)
            frac = full.reshape(len(keep), -1).mean(axis=1)
            usable = (frac >= self.min_valid_fraction) & (frac > 0)
            days = self.days[m][keep]
            step = np.where(usable, STEP_USABLE, STEP_UNUSABLE).astype(np.uint8)
            if m == "hr":
                # One HR image per sample: the first usable one (normally the only one).
                h = int(np.argmax(usable)) if usable.any() else 0
                rec[m] = {"data": data[h], "mask": mask[h], "days": days[h], "step": step[h]}
            else:
                rec[m] = {"data": data, "mask": mask, "days": days, "step": step}
        rec.update(
            name=f"{self.name}/r{r}c{c}",
            grp=self.name,
            row=r,
            col=c,
            crs=self.grid.crs.to_string(),
            bounds=self.grid.window(r, c, T, T).bounds,
            lat=float(self.latlon[j, 0]),
            lon=float(self.latlon[j, 1]),
            split=self.split,
            label=self.label,
        )
        return rec


class _AcquisitionFailed(Exception):
    def __init__(self, acq, path, reason):
        super().__init__(reason)
        self.acq, self.path, self.reason = acq, path, reason


def align_place(
    group: Group, plan: Plan, cfg: IngestConfig, split: str, label: tuple, spill_dir
) -> PlaceResult:
    """Warp, mask and tile one place, its tiles spilled under ``spill_dir``; never raises for
    bad files (they go to ``PlaceResult.bad``). Environment faults (disk full) do raise."""
    bad: list[tuple[str, str]] = []
    src = Sources()
    spill_dir = Path(spill_dir)
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, spill = tempfile.mkstemp(prefix="place-", suffix=".tmp", dir=spill_dir)
    os.close(fd)
    try:
        # An acquisition whose file fails while being read is dropped and the place redone
        # without it; every round removes one, so this ends.
        while True:
            try:
                res = _align_place(group, plan, cfg, split, label, src, bad, spill)
                if not res.valid:
                    Path(spill).unlink(missing_ok=True)
                    res.spill = None
                return res
            except _AcquisitionFailed as e:
                reason = e.reason
                if not reason.startswith(("unreadable", "no CRS")):
                    reason = f"unreadable or truncated: {reason}"
                bad.append((str(e.path), reason))
                for m, acqs in group.acquisitions.items():
                    group.acquisitions[m] = [a for a in acqs if a is not e.acq]
                src.close()
    except BaseException:
        Path(spill).unlink(missing_ok=True)
        raise
    finally:
        src.close()


def _group_row(group: Group, plan: Plan) -> dict:
    return {
        "grp": group.name,
        "crs": None,
        "transform": None,
        "height": 0,
        "width": 0,
        "hr_ratio": plan.hr_ratio,
        "n_tiles": 0,
        "acquisitions": [],
    }


def _align_place(group, plan, cfg, split, label, src, bad, spill) -> PlaceResult:
    row = _group_row(group, plan)
    res = PlaceResult(group.name, bad, row, split=split, label=label)
    res.min_valid_fraction = cfg.min_valid_fraction
    if not group.modalities:
        return res
    try:
        grid = place_grid(group, plan, cfg, src, bad)
    except BadInputError as e:
        # A file that fails to open drops its acquisition only (the place is redone without
        # it), not the whole place.
        for acqs in group.acquisitions.values():
            for a in acqs:
                if any(str(f) == str(e.path) for f in a.files):
                    raise _AcquisitionFailed(a, e.path, e.reason) from None
        bad.append((e.path, e.reason))
        return res
    mods = [m for m in group.modalities if group.acquisitions.get(m)]
    T = plan.tile_size
    rows, cols = _starts(grid.height, T), _starts(grid.width, T)
    ncols = len(cols)
    res.grid, res.rows, res.cols, res.tile = grid, rows, cols, T
    ratios = {m: plan.hr_ratio if (m == "hr" and not plan.hr_only) else 1 for m in mods}
    res.sides = {m: T * ratios[m] for m in mods}
    n_acq = {m: len(group.acquisitions[m]) for m in mods}
    res.offsets = {m: np.full((len(rows) * ncols, n_acq[m]), -1, np.int64) for m in mods}
    valid_total = {m: np.zeros(n_acq[m], np.int64) for m in mods}
    try:
        _spill_blocks(group, plan, cfg, src, res, ratios, valid_total, spill)
    except OSError as e:
        if e.filename is None:  # a write to the spill file (a full disk) names no file
            raise OSError(e.errno, e.strerror or str(e), spill) from e
        raise
    # Acquisitions without a single valid pixel over the whole place are bad input.
    for m in mods:
        res.keep[m] = []
        for k, acq in enumerate(group.acquisitions[m]):
            if valid_total[m][k] == 0:
                for f in acq.files:
                    bad.append((str(f), f"entirely nodata over place {group.name!r}"))
            else:
                res.keep[m].append(k)
        res.days[m] = np.array(
            [to_days(a.date) if a.date else 0 for a in group.acquisitions[m]], np.int32
        )
    # Each acquisition's step index in the place's series (what the manifest's acquisitions
    # table and the tiles' dates refer to).
    for m in mods:
        for step, k in enumerate(res.keep[m]):
            a = group.acquisitions[m][k]
            row["acquisitions"].append(
                {
                    "modality": m,
                    "step": step,
                    "sensor": a.sensor,
                    "days": to_days(a.date) if a.date else None,
                    "files": json.dumps(a.describe()),
                }
            )
    row.update(
        crs=grid.crs.to_string(),
        transform=list(grid.transform)[:6],
        height=grid.height,
        width=grid.width,
    )
    n_all = len(rows) * ncols
    has_any = np.zeros(n_all, bool)
    for m in mods:
        if res.keep[m]:
            has_any |= (res.offsets[m][:, res.keep[m]] >= 0).any(axis=1)
    res.valid = np.flatnonzero(has_any).tolist()
    res.n_dropped = n_all - len(res.valid)
    if res.valid:
        xs, ys = zip(
            *[
                grid.transform @ (cols[i % ncols] + T / 2.0, rows[i // ncols] + T / 2.0)
                for i in res.valid
            ]
        )
        lons, lats = warp_transform(grid.crs, WGS84, list(xs), list(ys))
        res.latlon = np.stack([np.asarray(lats, np.float64), np.asarray(lons, np.float64)], 1)
    else:
        for f in group.files:
            bad.append((str(f), f"every tile of place {group.name!r} is entirely nodata"))
    row["n_tiles"] = len(res.valid)
    res.spill = spill
    return res


def _spill_blocks(group, plan, cfg, src, res: PlaceResult, ratios, valid_total, spill) -> None:
    """Read the place block by block (:func:`tile_blocks`), one acquisition at a time, and
    append each tile piece that holds data to the spill file (offsets into ``res.offsets``)."""
    grid, rows, cols, T = res.grid, res.rows, res.cols, res.tile
    ncols = len(cols)
    row_index = {r: i for i, r in enumerate(rows)}
    col_index = {c: i for i, c in enumerate(cols)}
    mods = list(ratios)
    with open(spill, "wb") as out:
        pos = 0
        for brows, bcols in tile_blocks(rows, cols, T, plan.hr_ratio, cfg.block_pixels):
            b0, c0 = brows[0], bcols[0]
            block = grid.window(b0, c0, brows[-1] + T - b0, bcols[-1] + T - c0)
            for m in mods:
                ratio = ratios[m]
                bgrid = block.scaled(ratio) if ratio > 1 else block
                for k, acq in enumerate(group.acquisitions[m]):
                    try:
                        data, has_data, clear = read_acquisition(acq, bgrid, cfg, src)
                    except BadInputError as e:
                        raise _AcquisitionFailed(acq, e.path, e.reason) from None
                    except OSError as e:
                        if e.filename is not None or not acq.files:
                            raise  # an environment fault, not the file's
                        raise _AcquisitionFailed(
                            acq, acq.files[0], f"{type(e).__name__}: {e}"
                        ) from None
                    except Exception as e:  # noqa: BLE001 - GDAL read errors of damaged files
                        raise _AcquisitionFailed(
                            acq, acq.files[0], f"{type(e).__name__}: {e}"
                        ) from None
                    n_valid = int(has_data.sum())
                    valid_total[m][k] += n_valid
                    if n_valid == 0:
                        continue  # no piece of this block holds data (sparse places)
                    stored = to_store(m, data, has_data)
                    del data
                    # "clear" says something only where there is data.
                    mask = (
                        has_data.astype(np.uint8) * HAS_DATA
                        + (clear & has_data).astype(np.uint8) * CLEAR
                    )
                    for r in brows:
                        rs = slice((r - b0) * ratio, (r - b0 + T) * ratio)
                        for c in bcols:
                            cs = slice((c - c0) * ratio, (c - c0 + T) * ratio)
                            mk = mask[rs, cs]
                            if not (mk & HAS_DATA).any():
                                continue
                            i = row_index[r] * ncols + col_index[c]
                            res.offsets[m][i, k] = pos
                            out.write(np.ascontiguousarray(stored[rs, cs]).tobytes())
                            out.write(np.ascontiguousarray(mk).tobytes())
                            pos += stored[rs, cs].nbytes + mk.nbytes
                    del stored, mask, has_data, clear

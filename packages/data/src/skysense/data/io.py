"""Reading GeoTIFFs as they come: per-band files at native resolution, band stacks, any CRS.

The public reading API of the data package (ingest and the downstream tasks use it):

- :func:`read_band_folder`: a folder of one file per band (Sentinel-2 as distributed,
  BigEarthNet, OSCD) -> (C, H, W) float32 on one grid (20/60 m bands resampled to 10 m).
- :func:`read_stack`: a multi-band file -> (C, H, W) float32, optionally warped to a grid.
- :func:`find_band_files`, :func:`band_of_file`: which file holds which band.
- :func:`read_date` / :func:`skysense.data.dates.parse_date`: acquisition dates from a pattern,
  tags or sidecar files.
- :func:`stack_band_names`: which band of a stack is which (descriptions, else the sensor order).

Values come back in the sensor's units after the file's scale and offset (Sentinel-2: digital
numbers; Sentinel-1: as stored, dB or linear), as float32 with NaN where there is no data (the
file's nodata value, the sensor's default nodata, or outside the file). ``profile`` is a dict
in the style of rasterio's: ``crs``, ``transform``, ``height``, ``width``, ``count``, ``dtype``,
``nodata`` (NaN), plus ``bands`` (names), ``sensor``, ``files`` and ``date`` (or None).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from skysense.data.dates import (
    DateError,
    date_from_sidecar,
    date_from_tags,
    parse_date,
)
from skysense.data.geo import Grid, bounds_in, warp
from skysense.data.sensors import SensorSpec, get_sensor

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")

__all__ = [
    "BadInputError",
    "band_of_file",
    "check_dtype",
    "find_band_files",
    "is_raster",
    "open_raster",
    "parse_date",
    "read_band",
    "read_band_folder",
    "read_date",
    "read_stack",
    "scale_offset",
    "stack_band_names",
    "write_geotiff",
]


class BadInputError(ValueError):
    """A file that cannot be used as it is; ``path`` names it, ``reason`` says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES and not path.name.startswith(".")


def open_raster(path, *, check_pixels: bool = True) -> rasterio.io.DatasetReader:
    """Open ``path`` with rasterio, checking it has a CRS and that its pixels can be read.

    Raises :class:`BadInputError` for an unreadable or truncated file (with ``check_pixels``
    the last row of the last band is read, which is where truncation shows) and for a file
    without a CRS.
    """
    path = Path(path)
    try:
        ds = rasterio.open(path)
    except RasterioIOError as e:
        raise BadInputError(path, f"unreadable: {e}") from None
    try:
        if ds.crs is None:
            raise BadInputError(path, "no CRS: the file is not georeferenced")
        # A truncated GeoTIFF opens (the header is intact) but fails on its last strips.
        if check_pixels:
            ds.read(
                ds.count,
                window=rasterio.windows.Window(0, ds.height - 1, ds.width, 1),
            )
    except BadInputError:
        ds.close()
        raise
    except Exception as e:
        ds.close()
        raise BadInputError(path, f"unreadable or truncated: {e}") from None
    return ds


def band_of_file(path, sensor: str | SensorSpec) -> str | None:
    """The band of ``sensor`` that a per-band file holds, from its name, or None.

    The name is split on ``_ - . space``; the last token that names a band wins
    (``..._B8A.tif`` -> ``B8A``, ``T30UWU_20170621T110651_B05.tif`` -> ``B5``,
    ``S1A_IW_20150309_VV_grd_db.tif`` -> ``VV``). One-letter band names (R, G, B) count only as
    the last token, so a stray "B" in a name is not taken for blue.
    """
    spec = get_sensor(sensor)
    tokens = [t for t in re.split(r"[_\-.\s]+", Path(path).stem) if t]
    for i, tok in enumerate(reversed(tokens)):
        band = spec.canonical_band(tok)
        if band is not None and (len(band) > 1 or i == 0):
            return band
    return None


def find_band_files(folder, sensor: str | SensorSpec, bands=None) -> dict[str, Path]:
    """Map band name -> file for the per-band files of ``sensor`` directly in ``folder``.

    ``bands`` restricts (and orders) the result; a band asked for that has no file raises
    :class:`BadInputError`, as do two files claiming the same band.
    """
    spec = get_sensor(sensor)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not is_raster(p):
            continue
        band = band_of_file(p, spec)
        if band is None:
            continue
        if band in found:
            raise BadInputError(p, f"second file for band {band} (first: {found[band].name})")
        found[band] = p
    if bands is None:
        return {b: found[b] for b in spec.bands if b in found}
    out = {}
    for b in bands:
        cb = spec.canonical_band(b)
        if cb is None:
            raise ValueError(f"band {b!r} is not a band of {spec.name} {spec.bands}")
        if cb not in found:
            raise BadInputError(
                folder, f"no file for band {cb} of {spec.name} (found {sorted(found)})"
            )
        out[cb] = found[cb]
    return out


def scale_offset(ds, band: int) -> tuple[float, float]:
    """The (scale, offset) a band declares (1, 0 when none)."""
    s = ds.scales[band - 1] if ds.scales else 1.0
    o = ds.offsets[band - 1] if ds.offsets else 0.0
    return float(s if s is not None else 1.0), float(o if o is not None else 0.0)


def check_dtype(ds, spec: SensorSpec) -> None:
    """Raise :class:`BadInputError` when the file's dtype is not one ``spec`` accepts."""
    dtypes = set(ds.dtypes)
    bad = sorted(dtypes - set(spec.accepted_dtypes))
    if bad:
        raise BadInputError(
            ds.name,
            f"dtype {', '.join(bad)} does not match sensor {spec.name} "
            f"(accepted: {', '.join(spec.accepted_dtypes)})",
        )


def _nodata(ds, band: int, spec: SensorSpec, override=None) -> float | None:
    if override is not None:
        return float(override)
    nd = ds.nodatavals[band - 1] if ds.nodatavals else None
    if nd is not None:
        return float(nd)
    dtype = np.dtype(ds.dtypes[band - 1])
    if spec.nodata is not None and np.issubdtype(dtype, np.integer):
        return float(spec.nodata)
    if np.issubdtype(dtype, np.floating):
        # NaN is no data in a float file that declares nothing: it is masked pixel by pixel,
        # and a resampling kernel leaves it out instead of spreading it over its neighbours.
        return float("nan")
    return None


def _absent(ds, band: int, grid: Grid, nd: float | None, margin: int = 8) -> bool:
    """True when no block of ``band`` under ``grid`` (plus ``margin`` source pixels, for the
    resampling kernels) is stored in the file: a sparse GeoTIFF (``SPARSE_OK``) leaves empty
    blocks out and GDAL reads them as the band's nodata value (0 without one). Only then, and
    when that fill value is what ``nd`` calls nodata, is the read skipped; a large sparse place
    costs what its data costs, not its area."""
    if nd is None or ds.driver != "GTiff":
        return False
    declared = ds.nodatavals[band - 1] if ds.nodatavals else None
    fill = 0.0 if declared is None else float(declared)
    if not (fill == nd or (np.isnan(fill) and np.isnan(nd))):
        return False
    try:
        left, bottom, right, top = bounds_in(grid.bounds, grid.crs, ds.crs)
    except Exception:  # noqa: BLE001 - no shortcut when the footprint does not transform
        return False
    inv = ~ds.transform
    pts = [inv @ (x, y) for x in (left, right) for y in (bottom, top)]
    c0 = max(0, math.floor(min(p[0] for p in pts)) - margin)
    c1 = min(ds.width, math.ceil(max(p[0] for p in pts)) + margin)
    r0 = max(0, math.floor(min(p[1] for p in pts)) - margin)
    r1 = min(ds.height, math.ceil(max(p[1] for p in pts)) + margin)
    if c1 <= c0 or r1 <= r0:
        return False
    bh, bw = ds.block_shapes[band - 1]
    for i in range(r0 // bh, (r1 - 1) // bh + 1):
        for j in range(c0 // bw, (c1 - 1) // bw + 1):
            if ds.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=band) not in (None, "", "0"):
                return False
    return True


def read_band(
    ds,
    band: int,
    spec: SensorSpec,
    grid: Grid | None = None,
    *,
    resampling: str = "bilinear",
    nodata=None,
) -> np.ndarray:
    """Band ``band`` (1-based) of an open dataset on ``grid`` (default: its own grid), float32
    in the sensor's units after the band's scale and offset; NaN where there is no data."""
    grid = grid or Grid.of(ds)
    nd = _nodata(ds, band, spec, nodata)
    if _absent(ds, band, grid, nd):
        # Sparse GeoTIFF: no block under the grid is in the file, so all would read as nodata.
        return np.full(grid.shape, np.nan, np.float32)
    x = warp(ds, band, grid, resampling=resampling, src_nodata=nd)
    scale, offset = scale_offset(ds, band)
    if scale != 1.0 or offset != 0.0:
        x = x * np.float32(scale) + np.float32(offset)
        if spec.modality == "s2" and scale < 0.01:
            # A scale this small declares reflectance (0-1); the sensor's units are DN = x 10000.
            x = x * np.float32(10000.0)
    return x


def stack_band_names(ds, spec: SensorSpec) -> list[str]:
    """The band name of each band of a stack.

    From the band descriptions where every band has one that names a band of ``spec``; else by
    position when the stack has exactly ``spec.bands`` or ``spec.model_bands`` (in that order).
    An alpha band of an RGBA file is named ``"alpha"``. Raises :class:`BadInputError` when the
    band count matches neither.
    """
    descs = list(ds.descriptions or [])
    if descs and all(descs):
        names = [spec.canonical_band(d) for d in descs]
        if all(names) and len(set(names)) == len(names):
            return names
    interp = [c.name for c in (ds.colorinterp or [])]
    count = ds.count
    if count == len(spec.bands) + 1 and interp and interp[-1] == "alpha":
        return list(spec.bands) + ["alpha"]
    if count == len(spec.bands):
        return list(spec.bands)
    if count == len(spec.model_bands):
        return list(spec.model_bands)
    raise BadInputError(
        ds.name,
        f"{count} bands do not match sensor {spec.name}: expected {len(spec.bands)} "
        f"({' '.join(spec.bands)}) or {len(spec.model_bands)} ({' '.join(spec.model_bands)}), "
        "or band descriptions naming them",
    )


def _profile(grid: Grid, bands, spec: SensorSpec, files, date) -> dict:
    return {
        "driver": "GTiff",
        "crs": grid.crs,
        "transform": grid.transform,
        "height": grid.height,
        "width": grid.width,
        "count": len(bands),
        "dtype": "float32",
        "nodata": float("nan"),
        "bands": list(bands),
        "sensor": spec.name,
        "files": [str(f) for f in files],
        "date": date,
    }


def read_stack(
    path,
    bands=None,
    *,
    sensor: str | SensorSpec = "s2_l2a",
    grid: Grid | None = None,
    resampling: str = "bilinear",
    nodata=None,
    date_pattern=None,
) -> tuple[np.ndarray, dict]:
    """A multi-band file -> ``(array (C, H, W) float32, profile)``.

    ``bands``: names of the bands to return, in that order (default: the sensor's model bands
    when the file has them all, else every band of the file). ``grid``: warp onto it (default:
    the file's own grid). NaN marks nodata. Raises :class:`BadInputError` for an unreadable
    file, a missing CRS, a dtype or band count that does not match ``sensor``.
    """
    spec = get_sensor(sensor)
    with open_raster(path) as ds:
        check_dtype(ds, spec)
        names = stack_band_names(ds, spec)
        if bands is None:
            want = (
                list(spec.model_bands)
                if all(b in names for b in spec.model_bands)
                else [n for n in names if n != "alpha"]
            )
        else:
            want = []
            for b in bands:
                cb = spec.canonical_band(b)
                if cb is None or cb not in names:
                    raise BadInputError(path, f"band {b!r} not in this stack ({names})")
                want.append(cb)
        g = grid or Grid.of(ds)
        arr = np.stack(
            [
                read_band(ds, names.index(b) + 1, spec, g, resampling=resampling, nodata=nodata)
                for b in want
            ]
        )
        if "alpha" in names:
            alpha = warp(ds, names.index("alpha") + 1, g, resampling="nearest")
            arr[:, ~(alpha > 0)] = np.nan
        date = read_date(path, date_pattern, tags=ds.tags())
    if spec.units == "linear":
        arr = spec.to_model_units(arr)
    return arr, _profile(g, want, spec, [path], date)


def read_band_folder(
    folder,
    bands=None,
    resolution: float | None = 10,
    *,
    sensor: str | SensorSpec = "s2_l2a",
    grid: Grid | None = None,
    resampling: str = "bilinear",
    nodata=None,
    date_pattern=None,
) -> tuple[np.ndarray, dict]:
    """A folder of one file per band -> ``(array (C, H, W) float32, profile)`` on one grid.

    ``bands``: names (``"B02"`` and ``"B2"`` both work), default the sensor's model bands
    (Sentinel-2: the 10 bands of the spec, B1/B9/B10 dropped). The output grid is ``grid`` if
    given, else the grid of the folder's band whose native GSD is ``resolution`` metres (B2 for
    Sentinel-2 at 10 m: its CRS and pixels are kept, whatever the CRS), else the finest band's
    grid. Coarser bands are resampled onto it with ``resampling``. NaN marks nodata.
    """
    spec = get_sensor(sensor)
    files = find_band_files(folder, spec, bands if bands is not None else spec.model_bands)
    datasets = {}
    try:
        for b, p in files.items():
            datasets[b] = open_raster(p)
            check_dtype(datasets[b], spec)
            if datasets[b].count != 1:
                raise BadInputError(p, f"{datasets[b].count} bands in a per-band file of {b}")
        if grid is None:
            grid = _reference_grid(datasets, spec, resolution)
        arr = np.stack(
            [
                read_band(ds, 1, spec, grid, resampling=resampling, nodata=nodata)
                for ds in datasets.values()
            ]
        )
        first = next(iter(files.values()))
        date = read_date(first, date_pattern, tags=datasets[next(iter(files))].tags())
    finally:
        for ds in datasets.values():
            ds.close()
    if spec.units == "linear":
        arr = spec.to_model_units(arr)
    return arr, _profile(grid, list(files), spec, files.values(), date)


def _reference_grid(datasets: dict, spec: SensorSpec, resolution) -> Grid:
    if resolution is not None:
        for b, ds in datasets.items():
            if spec.native_gsd(b) == resolution:
                return Grid.of(ds)
    finest = min(datasets.values(), key=lambda d: abs(d.transform.a))
    g = Grid.of(finest)
    if resolution is not None and g.crs.is_projected and abs(g.res[0] - resolution) > 1e-6:
        return Grid.from_bounds(g.bounds, g.crs, resolution, origin=(g.transform.c, g.transform.f))
    return g


def read_date(path, pattern=None, *, tags: dict | None = None) -> dt.date | None:
    """The acquisition date of the file at ``path``, or None when nothing gives one.

    Looked for in this order: ``pattern`` (see :func:`parse_date`) on the file name, then its
    parent folders' names; the GeoTIFF tags (``ACQUISITION_DATE``, ``TIFFTAG_DATETIME``, ...);
    sidecar files (BigEarthNet metadata JSON, OSCD ``dates.txt``); the default pattern
    (YYYYMMDD / YYYY-MM-DD) on the file name, then its parent folders' names.
    Raises :class:`~skysense.data.dates.DateError` when a source that claims a date (a user
    pattern that matches, a date tag) holds one that does not parse.
    """
    path = Path(path)
    names = [path.name, path.parent.name, path.parent.parent.name]
    if pattern is not None:
        for n in names:
            try:
                return parse_date(n, pattern)
            except DateError as e:
                if "not a valid" in str(e):
                    raise
        raise DateError(f"{path}: no date matching pattern {pattern!r} in {names}")
    if tags is None:
        with rasterio.open(path) as ds:
            tags = ds.tags()
    d = date_from_tags(tags)
    if d is not None:
        return d
    d = date_from_sidecar(path)
    if d is not None:
        return d
    for n in names:
        try:
            return parse_date(n)
        except DateError as e:
            if "not a valid" in str(e):
                raise DateError(f"{path}: {e}") from None
    return None


def write_geotiff(
    path,
    array: np.ndarray,
    *,
    crs,
    transform,
    nodata=None,
    band_names=None,
    tags: dict | None = None,
    scales=None,
    offsets=None,
    interleave: str = "band",
) -> Path:
    """Write ``array`` (C, H, W) or (H, W) as a tiled, compressed GeoTIFF; returns the path.

    ``band_names`` go to the band descriptions (which :func:`stack_band_names` reads back),
    ``tags`` to the dataset metadata (e.g. ``{"ACQUISITION_DATE": "2021-06-01"}``). The file is
    written under a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"write_geotiff: array must be (C, H, W) or (H, W), got {arr.shape}")
    c, h, w = arr.shape
    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": c,
        "dtype": arr.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "interleave": interleave,
    }
    if h >= 256 and w >= 256:  # small rasters read and write fastest as plain strips
        profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(arr)
        if band_names is not None:
            for i, n in enumerate(band_names, 1):
                ds.set_band_description(i, n)
        if tags:
            ds.update_tags(**{k: str(v) for k, v in tags.items()})
        if scales is not None:
            ds.scales = tuple(scales)
        if offsets is not None:
            ds.offsets = tuple(offsets)
    tmp.replace(path)
    return path

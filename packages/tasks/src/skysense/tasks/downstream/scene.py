"""Windowed reading of a scene of any size: one modality's GeoTIFF stack or folder of per-band
files, read window by window onto a reference grid.

A :class:`SceneReader` keeps its files open and reads only the pixels under the window asked
for (:func:`skysense.data.io.read_band` warps a band onto any grid, reading just the source
pixels under it), so memory follows the window, not the scene. Bands come back in the model's
order and units, NaN where there is no data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from skysense.data.geo import Grid
from skysense.tasks.downstream.datasets.common import normalise, series_sample

log = logging.getLogger(__name__)


class SceneReader:
    """One modality of a scene.

    Args:
        path: a multi-band GeoTIFF, or a folder of one GeoTIFF per band (Sentinel-2 as
            distributed).
        sensor: the sensor registry name (``hr_rgb``, ``s2_l1c``, ``s2_l2a``, ``s1_grd_db``...).
        bands: the bands to read, in the model's order (default: the sensor's model bands).
    """

    def __init__(self, path: str | Path, sensor: str, bands: Sequence[str] | None = None):
        from skysense.data import io
        from skysense.data.sensors import get_sensor

        self.path = Path(path)
        self.spec = get_sensor(sensor)
        self.bands = list(bands or self.spec.model_bands)
        self._handles = []
        self._sources: list[tuple[object, int]] = []  # (dataset, 1-based band) per model band
        if self.path.is_dir():
            files = io.find_band_files(self.path, self.spec, self.bands)
            for f in files.values():
                ds = io.open_raster(f)
                io.check_dtype(ds, self.spec)
                self._handles.append(ds)
                self._sources.append((ds, 1))
            # The grid of the finest band (B2 at 10 m for Sentinel-2): its CRS and pixels.
            finest = min(self._handles, key=lambda d: abs(d.transform.a))
            self.grid = Grid.of(finest)
            first = next(iter(files.values()))
            self.nodata = finest.nodata
        else:
            ds = io.open_raster(self.path)
            io.check_dtype(ds, self.spec)
            self._handles.append(ds)
            names = io.stack_band_names(ds, self.spec)
            for b in self.bands:
                cb = self.spec.canonical_band(b)
                if cb not in names:
                    raise ValueError(f"{self.path}: band {b} not in the stack ({names})")
                self._sources.append((ds, names.index(cb) + 1))
            self.grid = Grid.of(ds)
            first = self.path
            self.nodata = ds.nodata
        self.date = io.read_date(first, tags=self._handles[0].tags())

    def read(self, grid: Grid) -> np.ndarray:
        """(C, grid.height, grid.width) float32 on ``grid``, NaN where there is no data
        (nodata, or outside the scene)."""
        from skysense.data import io

        return np.stack([io.read_band(ds, b, self.spec, grid) for ds, b in self._sources])

    def close(self) -> None:
        for ds in self._handles:
            ds.close()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SceneStack:
    """Every date and modality of one inference input, open and aligned on one reference grid.

    Args:
        stack: the ExitStack that closes the readers.
        dates: the reference modality's scene per date (one; two for change detection).
        extra: modality -> path for the model's other modalities (read for every date).
        inputs: the model's input description (``meta["inputs"]`` of a fine-tuned model:
            ``reference``, ``modalities``, ``sensors`` and per modality ``bands``, ``mean``,
            ``std``).

    Raises ValueError when a later date is not on the first date's grid. HR beside a
    Sentinel reference is read on the same footprint at its own pixel size (``hr_factor``
    HR pixels per reference pixel).
    """

    def __init__(
        self,
        stack: ExitStack,
        dates: Sequence[str | Path],
        extra: Mapping[str, str | Path],
        inputs: Mapping,
    ):
        self.inputs = inputs
        self.ref = ref = inputs["reference"]
        self.mods = list(inputs["modalities"])
        self.readers: list[dict[str, SceneReader]] = []
        for path in dates:
            paths = {m: (path if m == ref else extra[m]) for m in [ref, *self.mods]}
            self.readers.append(
                {
                    m: stack.enter_context(SceneReader(p, inputs["sensors"][m], inputs[m]["bands"]))
                    for m, p in paths.items()
                }
            )
        self.grid = self.readers[0][ref].grid
        for i, rd in enumerate(self.readers[1:], start=2):
            if not rd[ref].grid.same_as(self.grid):
                raise ValueError(
                    f"date {i} ({dates[i - 1]}) is not on the grid of date 1 ({dates[0]})"
                )
        self.hr_factor = 1
        if "hr" in self.mods and ref != "hr":
            hr_res = self.readers[0]["hr"].grid.res[0]
            self.hr_factor = max(1, int(round(self.grid.res[0] / hr_res)))

    def window(self, top: int, left: int, size: int) -> tuple[list[dict], np.ndarray]:
        """The ``size`` x ``size`` reference-pixel window at (top, left): one contract sample
        per date (normalised float32 tensors, day of year 0 where undated) and the (size, size)
        bool mask of reference pixels where every date has data."""
        wgrid = self.grid.window(top, left, size, size)
        grids = {m: wgrid for m in self.mods}
        if "hr" in self.mods and self.ref != "hr":
            grids["hr"] = wgrid.scaled(self.hr_factor)
        per_date = [self._sample(rd, grids) for rd in self.readers]
        valid = np.logical_and.reduce([v for _, v in per_date])
        return [s for s, _ in per_date], valid

    def _sample(
        self, readers: Mapping[str, SceneReader], grids: Mapping
    ) -> tuple[dict, np.ndarray]:
        sample, valid = {}, None
        for m, r in readers.items():
            stats = self.inputs[m]
            x, ok = normalise(r.read(grids[m]), stats["mean"], stats["std"])
            if m == self.ref:
                valid = ok.numpy()
            doy = r.date.timetuple().tm_yday if r.date is not None else 0
            if m == "hr":
                sample["hr"] = x
                sample["hr_doy"] = torch.tensor(doy, dtype=torch.int64)
            else:
                sample.update(series_sample(m, [x], [doy]))
        return sample, valid


# Tokens in file names and tags that give a Sentinel-2 product's processing level.
_LEVEL_TOKENS = {
    "L1C": ("MSIL1C", "L1C", "LEVEL-1C", "LEVEL1C"),
    "L2A": ("MSIL2A", "L2A", "LEVEL-2A"),
}
# Level of each registered Sentinel-2 product.
_SENSOR_LEVEL = {"s2_l1c": "L1C", "s2_l2a": "L2A"}


def scene_problems(path: str | Path, sensor: str) -> list[str]:
    """Why a scene does not look like ``sensor``'s product, the one a model was fine-tuned on
    (empty when nothing is wrong): the processing level (Sentinel-2 Level-1C vs Level-2A, from
    file names, tags and band sets), band descriptions naming bands the product lacks, the band
    count of a stack, and a pixel size far from the sensor's (a factor of two either way).
    """
    import rasterio

    from skysense.data import io
    from skysense.data.sensors import get_sensor

    spec = get_sensor(sensor)
    path = Path(path)
    files = sorted(p for p in path.iterdir() if io.is_raster(p)) if path.is_dir() else [path]
    if not files:
        return [f"{path}: no raster files"]
    problems = []
    want = _SENSOR_LEVEL.get(spec.name)
    pixel_m = []
    for f in files:
        with rasterio.open(f) as ds:
            pixel_m.append(_pixel_metres(ds.res, ds.crs, ds.bounds))
            if f == files[0]:
                tags = " ".join(str(v) for v in ds.tags().values()).upper()
                descs = [d for d in (ds.descriptions or []) if d]
                count, dtype = ds.count, ds.dtypes[0]
    if spec.accepted_dtypes and dtype not in spec.accepted_dtypes:
        problems.append(
            f"{dtype} does not match sensor {spec.name} (accepted: {', '.join(spec.accepted_dtypes)})"
        )
    names = " ".join(p.name.upper() for p in [path, *files])
    if want:
        other = "L1C" if want == "L2A" else "L2A"
        if any(t in names or t in tags for t in _LEVEL_TOKENS[other]):
            problems.append(
                f"a Sentinel-2 {other} product (file names or tags), model takes {want}"
            )
        if want == "L2A" and (
            any(get_sensor("s2_l1c").canonical_band(p.stem.split("_")[-1]) == "B10" for p in files)
            or (not path.is_dir() and count == len(get_sensor("s2_l1c").bands))
        ):
            problems.append("band B10 (cirrus) is present, as in Level-1C; Level-2A has no B10")
    foreign = [d for d in descs if spec.canonical_band(d) is None and d.lower() != "alpha"]
    if foreign and len(descs) == count:
        problems.append(f"band descriptions {foreign} are not bands of {spec.name} {spec.bands}")
    if not path.is_dir() and count not in (
        len(spec.bands),
        len(spec.model_bands),
        len(spec.bands) + 1,
    ):
        problems.append(
            f"{count} bands; {spec.name} has {len(spec.bands)} ({' '.join(spec.bands)}), the model "
            f"takes {len(spec.model_bands)} ({' '.join(spec.model_bands)})"
        )
    gsd = [g for b, g in zip(spec.bands, spec.gsd) if b in spec.model_bands and g]
    known = [m for m in pixel_m if m is not None]
    if gsd and known:
        px, finest = min(known), min(gsd)
        if not finest / 2 <= px <= finest * 2:
            problems.append(
                f"pixels of {px:.3g} m; {spec.name}'s finest model band is {finest:g} m"
            )
    return problems


def _pixel_metres(res, crs, bounds) -> float | None:
    """The pixel width of a grid in metres (geographic CRSs at the scene's latitude)."""
    if crs is None:
        return None
    if crs.is_projected:
        return float(res[0]) * float(crs.linear_units_factor[1])
    if crs.is_geographic:
        lat = np.deg2rad((bounds.top + bounds.bottom) / 2)
        return float(res[0]) * 111_320.0 * float(np.cos(lat))
    return None


def check_scenes(scenes: Mapping[str, list], sensors: Mapping[str, str], strict: bool) -> None:
    """Each scene (modality -> paths) against the sensor the model was fine-tuned on
    (:func:`scene_problems`). Raises ValueError naming the file and what differs when
    ``strict``; logs a warning otherwise."""
    for mod, paths in scenes.items():
        if mod not in sensors:
            continue
        for path in paths:
            problems = scene_problems(path, sensors[mod])
            if not problems:
                continue
            msg = (
                f"{path} does not look like the {sensors[mod]} input the model was fine-tuned "
                f"on: {'; '.join(problems)}"
            )
            if strict:
                raise ValueError(msg + " (check_sensor=false runs it anyway)")
            log.warning("%s (check_sensor=false: running anyway)", msg)

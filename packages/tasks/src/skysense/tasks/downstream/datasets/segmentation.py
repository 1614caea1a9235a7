"""Semantic segmentation scenes from GeoTIFFs: inputs of one or more modalities and a label mask
aligned to them (the label format "GeoTIFF label masks aligned to the image").

A scene is described by paths::

    {"name": "tile_07", "mask": "labels/tile_07.tif",
     "hr": "hr/tile_07.tif",                       # optional: an HR RGB stack
     "s2": ["s2/t07_20200412.tif", ...],           # optional: S2 stacks (or band folders), one per date
     "s1": ["s1/t07_20200410.tif", ...]}           # optional: S1 stacks, one per date

The *reference* modality (the task's feature source, else S2, else S1, else HR) keeps its own
grid; the mask is read onto it (:func:`read_label_mask`); the other Sentinel modality is warped
onto the same grid and HR onto the same footprint at an integer number of HR pixels per
reference pixel, so every input of a crop covers the same ground.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from skysense.kernels.modalities import DEFAULT_SENSORS, MODALITIES
from skysense.tasks.downstream.datasets.common import day_of_year, normalise, series_sample
from skysense.tasks.downstream.datasets.dense import DenseScene
from skysense.tasks.downstream.datasets.masks import read_label_mask


def _read(path, spec, grid=None):
    from skysense.data import io

    path = Path(path)
    if path.is_dir():
        return io.read_band_folder(path, sensor=spec, grid=grid, resolution=10)
    return io.read_stack(path, sensor=spec, grid=grid)


def load_segmentation_scene(
    desc: Mapping,
    reference: str | None = None,
    sensors: Mapping[str, str] | None = None,
    values: Mapping[int, int] | None = None,
    root: str | Path | None = None,
) -> DenseScene:
    """A scene of :data:`desc` (see the module docstring). ``values``: raw mask value -> class."""
    from skysense.data.geo import Grid
    from skysense.data.sensors import get_sensor

    sensors = {**DEFAULT_SENSORS, **dict(sensors or {})}
    root = Path(root) if root is not None else Path(".")
    mods = [m for m in MODALITIES if desc.get(m)]
    if not mods:
        raise ValueError(f"segmentation scene {desc.get('name')}: no input (give hr, s2 and/or s1)")
    if "mask" not in desc:
        raise ValueError(f"segmentation scene {desc.get('name')}: no 'mask'")
    ref = reference if reference in mods else next(m for m in ("s2", "s1", "hr") if m in mods)

    def paths(m):
        v = desc[m]
        return [root / p for p in ([v] if isinstance(v, (str, Path)) else v)]

    sample: dict = {}
    first = paths(ref)[0]
    arr, prof = _read(first, get_sensor(sensors[ref]))
    grid = Grid(prof["crs"], prof["transform"], prof["height"], prof["width"])
    rgb = None
    for m in mods:
        spec = get_sensor(sensors[m])
        g = grid
        if m == "hr" and ref != "hr":
            hr_res = _native_res(paths("hr")[0])
            f = max(1, int(round(grid.res[0] / hr_res)))
            g = grid.scaled(f)
        steps, doys, valids = [], [], []
        for p in paths(m):
            a, pr = _read(p, spec, grid=g)
            x, valid = normalise(a, spec.mean, spec.std)
            steps.append(x)
            valids.append(valid)
            doys.append(day_of_year(pr["date"]))
            if m == "hr" or (rgb is None and m == "s2"):
                rgb = _preview(a, m)
        if m == "hr":
            sample["hr"] = steps[0]
            sample["hr_pixel_valid"] = valids[0]
            sample["hr_doy"] = torch.tensor(doys[0], dtype=torch.int64)
        else:
            sample.update(series_sample(m, steps, doys, valids))
    lat, lon = grid.centre_latlon()
    sample["latlon"] = torch.tensor([lat, lon], dtype=torch.float32)
    mask = torch.from_numpy(read_label_mask(root / desc["mask"], prof, values))
    return DenseScene(str(desc.get("name", Path(desc["mask"]).stem)), sample, mask, rgb, prof)


def _native_res(path) -> float:
    import rasterio

    with rasterio.open(path) as ds:
        return abs(ds.transform.a)


def _preview(a: np.ndarray, modality: str) -> np.ndarray:
    if modality == "hr":
        return np.nan_to_num(a[:3].transpose(1, 2, 0)).clip(0, 255).astype(np.uint8)
    x = np.nan_to_num(a[[2, 1, 0]].transpose(1, 2, 0))
    lo, hi = np.percentile(x, 2, axis=(0, 1)), np.percentile(x, 98, axis=(0, 1))
    return (np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def load_scenes(descs: Sequence[Mapping], **kw) -> list[DenseScene]:
    return [load_segmentation_scene(d, **kw) for d in descs]

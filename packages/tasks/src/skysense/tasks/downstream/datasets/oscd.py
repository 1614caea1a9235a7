"""Onera Satellite Change Detection (OSCD; Daudt et al., IGARSS 2018): Sentinel-2 L1C pairs of
24 cities, 13 bands as per-band GeoTIFFs at native resolution (EPSG:4326), dates in
``dates.txt``; pixel change masks for the labelled cities.

Layout (as distributed, and as in ``../shared/data/oscd``)::

    images/<city>/imgs_1/*_B01.tif ... *_B12.tif, imgs_2/..., dates.txt
    labels/<city>/cm/<city>-cm.tif      (1 = no change, 2 = change in this copy)

Bands are read with :func:`skysense.data.io.read_band_folder` (20 / 60 m bands resampled to the
10 m grid of B2), the model's 10 bands kept (B1, B9, B10 dropped) and normalised with the
``s2_l1c`` sensor's statistics. A city is held in memory whole (a few MB); random training crops come from
:class:`~skysense.tasks.downstream.datasets.dense.DenseCrops`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from skysense.tasks.downstream.datasets.common import (
    IGNORE_INDEX,
    day_of_year,
    normalise,
    series_sample,
)
from skysense.tasks.downstream.datasets.dense import DenseScene
from skysense.tasks.downstream.datasets.masks import read_label_mask

log = logging.getLogger(__name__)


def _rgb(arr: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """(C, H, W) digital numbers -> (H, W, 3) uint8 true colour, 2-98 % stretch per band (top
    of atmosphere blue is brighter than red: one stretch for all bands gives a blue cast)."""
    idx = [list(bands).index(b) for b in ("B4", "B3", "B2")]
    x = np.nan_to_num(arr[idx].transpose(1, 2, 0))
    lo, hi = np.percentile(x, 2, axis=(0, 1)), np.percentile(x, 98, axis=(0, 1))
    return (np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def load_oscd_city(
    root: str | Path,
    city: str,
    sensor: str = "s2_l1c",
    label_values: Mapping[int, int] | None = None,
) -> DenseScene:
    """One OSCD city: ``sample = {"t1": s2 sample, "t2": s2 sample}`` (each ``s2`` (1, 10, H, W)),
    ``mask`` (H, W): 0 no change, 1 change, 255 unknown (no label or no data on a date)."""
    from skysense.data import io
    from skysense.data.geo import Grid
    from skysense.data.sensors import get_sensor

    root = Path(root)
    spec = get_sensor(sensor)
    folder = root / "images" / city
    if not folder.is_dir():
        have = (
            sorted(p.name for p in (root / "images").iterdir())
            if (root / "images").is_dir()
            else []
        )
        raise FileNotFoundError(f"OSCD city {city!r}: no folder {folder} (cities here: {have})")
    label = root / "labels" / city / "cm" / f"{city}-cm.tif"
    if not label.is_file():
        raise FileNotFoundError(f"OSCD city {city!r} has no change mask {label}")
    dates, rgbs, profile = [], [], None
    for i in (1, 2):
        arr, prof = io.read_band_folder(folder / f"imgs_{i}", sensor=spec, resolution=10)
        if profile is not None and (prof["height"], prof["width"]) != (
            profile["height"],
            profile["width"],
        ):
            raise ValueError(
                f"OSCD {city}: imgs_1 is {profile['height']} x {profile['width']} but imgs_{i} "
                f"{prof['height']} x {prof['width']}"
            )
        profile = profile or prof
        x, valid = normalise(arr, spec.mean, spec.std)
        dates.append((x, valid, prof["date"]))
        rgbs.append(_rgb(arr, prof["bands"]))
    values = dict(label_values) if label_values is not None else {1: 0, 2: 1}
    mask = torch.from_numpy(read_label_mask(label, profile, values))
    lat, lon = Grid(
        profile["crs"], profile["transform"], profile["height"], profile["width"]
    ).centre_latlon()
    latlon = torch.tensor([lat, lon], dtype=torch.float32)
    ts = []
    for x, valid, date in dates:
        mask[~valid] = IGNORE_INDEX
        s = series_sample("s2", [x], [day_of_year(date)])
        s["latlon"] = latlon
        ts.append(s)
    n_change = int((mask == 1).sum())
    log.info(
        "OSCD %s: %d x %d px, %s -> %s, %.2f%% change",
        city,
        mask.shape[0],
        mask.shape[1],
        dates[0][2],
        dates[1][2],
        100.0 * n_change / max(1, int((mask != IGNORE_INDEX).sum())),
    )
    return DenseScene(city, {"t1": ts[0], "t2": ts[1]}, mask, np.stack(rgbs), profile)

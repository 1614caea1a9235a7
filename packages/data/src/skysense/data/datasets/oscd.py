"""Onera Satellite Change Detection (OSCD; Daudt et al., IGARSS 2018): Sentinel-2 L1C pairs of
24 cities, 13 bands as one GeoTIFF per band at native resolution (10 / 20 / 60 m, EPSG:4326),
dates in ``dates.txt``, pixel change masks for the labelled cities.

Layout (as distributed; the shared copy names the top folders ``images`` and ``labels``)::

    <images>/<city>/imgs_1/*_B01.tif ... *_B12.tif, *_B8A.tif   (date 1)
    <images>/<city>/imgs_2/...                                  (date 2)
    <images>/<city>/dates.txt                                   date_1: YYYYMMDD ...
    <images>/train.txt, test.txt                                comma-separated city names
    <labels>/<city>/cm/<city>-cm.tif                            change mask (no georeference)

with ``<images>`` = ``images`` or ``Onera Satellite Change Detection dataset - Images`` and
``<labels>`` = ``labels`` or ``Onera Satellite Change Detection dataset - {Train,Test}
Labels``. The mask lies on date 1's grid (the 10 m grid of B02). The two dates of a city may
lie on different grids: date 2 is resampled (bilinear) onto date 1's grid.

An item is one whole city ``{"t1": s2 sample, "t2": s2 sample, "mask": (H, W)}``: 0 no change,
1 change, 255 unknown (no label value, or no data on a date). OSCD has no validation split:
``val`` is the test cities.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import (
    S2_L1C_ORDER,
    check_range,
    day_of_year,
    latlon_of,
    modality_sample,
    read_mask,
)

log = logging.getLogger(__name__)

_IMAGES = ("images", "Onera Satellite Change Detection dataset - Images")
_LABELS = (
    "labels",
    "Onera Satellite Change Detection dataset - Train Labels",
    "Onera Satellite Change Detection dataset - Test Labels",
)


def _city_list(path: Path) -> list[str]:
    return [c.strip() for c in path.read_text().replace("\n", ",").split(",") if c.strip()]


class OSCD(RemoteSensingDataset):
    """Args (beyond the base's):
    cities: explicit city names (override the split files).
    label_values: raw mask value -> class (default 1 -> 0 no change, 2 -> 1 change, as the
        distributed GeoTIFF masks hold); a mask holding other values is an error.
    resampling: how date 2 is put on date 1's grid when the grids differ.
    """

    name = "oscd"
    task = "change"
    sensors = {"s2": "s2_l1c"}
    file_bands = {"s2": S2_L1C_ORDER}
    resolution = {"s2": 10.0}
    crs = "EPSG:4326 per band file; 20/60 m bands and date 2 resampled onto date 1's B02 grid"
    classes = ("no change", "change")
    label_encoding = "<city>-cm.tif: 1 = no change, 2 = change (set label_values for 0/1 copies)"
    split_files = {"train": "train.txt", "val": "test.txt", "test": "test.txt"}
    layout = (
        "root/images/<city>/imgs_{1,2}/*_B??.tif + dates.txt; root/labels/<city>/cm/<city>-cm.tif"
    )

    def __init__(
        self,
        root,
        split: str = "train",
        split_file=None,
        cities=None,
        label_values=None,
        resampling: str = "bilinear",
        sensor: str = "s2_l1c",
    ):
        super().__init__(root, split, split_file)
        self.sensor = sensor
        self.images = next((self.root / d for d in _IMAGES if (self.root / d).is_dir()), None)
        if self.images is None:
            raise FileNotFoundError(
                f"oscd: no folder {self.root / 'images'} (expected layout: {self.layout})"
            )
        self.values = (
            {int(k): int(v) for k, v in dict(label_values).items()}
            if label_values
            else {1: 0, 2: 1}
        )
        self.resampling = resampling
        if cities:
            names = list(cities)
        elif self.split_file is not None:
            names = _city_list(self.split_file)
        else:
            f = self.images / self.split_files[split]
            if not f.is_file():
                labelled = sorted(
                    p.name for p in self.images.iterdir() if p.is_dir() and self._label(p.name)
                )
                raise DatasetError(
                    f"oscd: no split file {f}; name the cities (data.train_cities / "
                    f"data.val_cities; labelled here: {', '.join(labelled)})"
                )
            names = _city_list(f)
        self.items = [{"name": c} for c in names]

    def _label(self, city: str) -> Path | None:
        for d in _LABELS:
            p = self.root / d / city / "cm" / f"{city}-cm.tif"
            if p.is_file():
                return p
        return None

    def __getitem__(self, i: int) -> dict:
        from skysense.data import io
        from skysense.data.geo import Grid
        from skysense.data.sensors import get_sensor

        city = self.items[i]["name"]
        folder = self.images / city
        if not folder.is_dir():
            have = sorted(p.name for p in self.images.iterdir() if p.is_dir())
            raise FileNotFoundError(f"oscd city {city!r}: no folder {folder} (cities: {have})")
        label = self._label(city)
        if label is None:
            raise FileNotFoundError(f"oscd city {city!r} has no change mask <labels>/{city}/cm/")
        spec = get_sensor(self.sensor)
        a1, p1 = io.read_band_folder(folder / "imgs_1", sensor=spec, resolution=10)
        grid = Grid(p1["crs"], p1["transform"], p1["height"], p1["width"])
        a2, p2 = io.read_band_folder(
            folder / "imgs_2", sensor=spec, grid=grid, resampling=self.resampling
        )
        own = io.find_band_files(folder / "imgs_2", spec, ["B2"])["B2"]
        with io.open_raster(own, check_pixels=False) as ds:
            if not Grid.of(ds).same_as(grid):
                log.info(
                    "oscd %s: date 2 (%d x %d) resampled onto date 1's grid (%d x %d)",
                    city, ds.height, ds.width, grid.height, grid.width,
                )  # fmt: skip
        for a, p in ((a1, p1), (a2, p2)):
            check_range(p["files"][0], a, spec)
        raw = read_mask(label)
        if raw.shape != (grid.height, grid.width):
            raise DatasetError(
                f"{label}: {raw.shape[0]} x {raw.shape[1]} px, but date 1 of {city} is "
                f"{grid.height} x {grid.width}"
            )
        unknown = sorted(set(np.unique(raw).tolist()) - set(self.values))
        if unknown:
            raise DatasetError(
                f"{label}: values {unknown} not in label_values {sorted(self.values)} "
                "(set data.label_values, e.g. {0: 0, 1: 1} for 0/1 masks)"
            )
        mask = np.full(raw.shape, IGNORE_INDEX, np.int64)
        for v, c in self.values.items():
            mask[raw == v] = c
        mask = torch.from_numpy(mask)
        ll = latlon_of(p1)
        out = {}
        for key, a, p in (("t1", a1, p1), ("t2", a2, p2)):
            s = modality_sample("s2", [a], spec.name, [day_of_year(p["date"])])
            mask[~s["s2_pixel_valid"][0]] = IGNORE_INDEX
            s["latlon"] = ll
            out[key] = s
        out["mask"] = mask
        out["name"] = city
        out["profile"] = {k: p1[k] for k in ("crs", "transform", "height", "width")}
        return out

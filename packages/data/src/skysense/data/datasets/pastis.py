"""PASTIS / PASTIS-R (Garnot & Landrieu 2021, 2022), as PANGAEA / the authors distribute it:
2,433 patches of 128 x 128 px at 10 m in France (Lambert-93), Sentinel-2 series (33-61 dates)
and Sentinel-1 ascending / descending series, semantic crop-type labels.

Layout::

    metadata.geojson              features: ID_PATCH, Fold (1-5), dates-S2 / dates-S1A /
                                  dates-S1D ({"0": 20180917, ...}), geometry (EPSG:2154)
    DATA_S2/S2_<id>.npy           (T, 10, 128, 128) int16: B2 B3 B4 B5 B6 B7 B8 B8A B11 B12
    DATA_S1A/S1A_<id>.npy         (T, 3, 128, 128) float: VV, VH, VV/VH (dB) ascending
    DATA_S1D/S1D_<id>.npy         likewise, descending
    ANNOTATIONS/TARGET_<id>.npy   (3, 128, 128): channel 0 = semantic class 0..19

Classes: 0 background, 1-18 crop types, 19 void (ignored). Splits: the official folds, train =
folds 1-3, val = fold 4, test = fold 5. An item: ``s2`` (T, 10, 128, 128) with its days of
year, ``s1`` (from the ascending orbit, or ``s1_orbit=descending``), ``mask`` (128, 128).
``max_steps`` keeps that many dates, evenly spaced (the paper samples 20 S2 / 10 S1 steps).
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import check_range, modality_sample

PASTIS_CLASSES = (
    "background", "meadow", "soft winter wheat", "corn", "winter barley", "winter rapeseed",
    "spring barley", "sunflower", "grapevine", "beet", "winter triticale", "winter durum wheat",
    "fruits, vegetables, flowers", "potatoes", "leguminous fodder", "soybeans", "orchard",
    "mixed cereal", "sorghum",
)  # fmt: skip
_FOLDS = {"train": (1, 2, 3), "val": (4,), "test": (5,)}


def _doys(dates) -> list[int]:
    out = []
    for k in sorted(dates, key=int):
        d = str(dates[k])
        out.append(dt.date(int(d[:4]), int(d[4:6]), int(d[6:8])).timetuple().tm_yday)
    return out


def _even(n: int, k: int | None) -> np.ndarray:
    if not k or n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


class PASTIS(RemoteSensingDataset):
    """Args: ``folds``: explicit folds instead of the split's; ``max_steps``: dates kept per
    series (None: all); ``s1_orbit``: ``ascending`` or ``descending``."""

    name = "pastis"
    task = "segmentation"
    sensors = {"s2": "s2_l2a", "s1": "s1_grd_db"}
    file_bands = {
        "s2": ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"),
        "s1": ("VV", "VH", "VV/VH"),
    }
    resolution = {"s2": 10.0, "s1": 10.0}
    crs = "EPSG:2154 patch footprints in metadata.geojson (lat/lon of the centre kept)"
    classes = PASTIS_CLASSES
    label_encoding = "TARGET_<id>.npy channel 0: 0 background, 1-18 crops, 19 void (ignored)"
    split_files = {}
    layout = "root/metadata.geojson, root/DATA_S2/S2_<id>.npy, root/DATA_S1A/, root/DATA_S1D/, root/ANNOTATIONS/TARGET_<id>.npy"

    def __init__(
        self,
        root,
        split="train",
        split_file=None,
        modalities=("s2",),
        folds=None,
        max_steps: int | None = None,
        s1_orbit: str = "ascending",
    ):
        super().__init__(root, split, split_file, modalities)
        meta = self.root / "metadata.geojson"
        if not meta.is_file():
            raise FileNotFoundError(f"pastis: no {meta} (expected layout: {self.layout})")
        feats = json.loads(meta.read_text())["features"]
        self.max_steps, self.orbit = max_steps, {"ascending": "S1A", "descending": "S1D"}[s1_orbit]
        names = self.split_names()
        keep = set(folds) if folds else set(_FOLDS[split])
        self.items = []
        for f in feats:
            p = f["properties"]
            pid = str(p["ID_PATCH"])
            if (names is not None and pid not in names) or (
                names is None and p["Fold"] not in keep
            ):
                continue
            self.items.append({"name": pid, "props": p, "geometry": f.get("geometry")})
        if not self.items:
            raise DatasetError(f"pastis {split}: no patch of folds {sorted(keep)} in {meta}")
        from rasterio.crs import CRS

        crs = json.loads(meta.read_text()).get("crs", {}).get("properties", {}).get("name")
        self.crs_of_geometry = CRS.from_user_input(crs) if crs else CRS.from_epsg(2154)

    def _latlon(self, geom) -> torch.Tensor:
        from skysense.data.geo import point_latlon

        if not geom:
            return torch.full((2,), float("nan"))
        pts = np.asarray(geom["coordinates"], dtype=np.float64).reshape(-1, 2)
        x, y = (pts.min(0) + pts.max(0)) / 2
        lat, lon = point_latlon(float(x), float(y), self.crs_of_geometry)
        return torch.tensor([lat, lon], dtype=torch.float32)

    def _series(self, m: str, pid: str, props: dict) -> dict:
        folder, prefix, key = (
            ("DATA_S2", "S2", "dates-S2")
            if m == "s2"
            else (f"DATA_{self.orbit}", self.orbit, f"dates-{self.orbit}")
        )
        path = self.root / folder / f"{prefix}_{pid}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"pastis patch {pid}: no {path}")
        x = np.load(path, allow_pickle=False)
        doys = _doys(props[key])
        want_c = 10 if m == "s2" else 3
        if x.ndim != 4 or x.shape[1] != want_c or x.shape[0] != len(doys):
            raise DatasetError(
                f"{path}: shape {x.shape}, expected ({len(doys)}, {want_c}, H, W) "
                f"({len(doys)} dates in metadata.geojson)"
            )
        idx = _even(len(doys), self.max_steps)
        arrays = [
            x[t, :2].astype(np.float32) if m == "s1" else x[t].astype(np.float32) for t in idx
        ]
        from skysense.data.sensors import get_sensor

        spec = get_sensor(self.sensors[m])
        for a in arrays[:1]:
            check_range(path, a, spec)
        if m == "s2":
            for a in arrays:
                a[:, (a == 0).all(0)] = np.nan
        return modality_sample(m, arrays, spec.name, [doys[t] for t in idx])

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        s: dict = {}
        for m in self.modalities:
            s.update(self._series(m, it["name"], it["props"]))
        tgt = np.load(self.root / "ANNOTATIONS" / f"TARGET_{it['name']}.npy", allow_pickle=False)
        sem = np.asarray(tgt[0] if tgt.ndim == 3 else tgt, dtype=np.int64)
        sem[(sem == 19) | (sem < 0) | (sem > 19)] = IGNORE_INDEX
        s["mask"] = torch.from_numpy(sem)
        s["latlon"] = self._latlon(it["geometry"])
        s["name"] = it["name"]
        return s

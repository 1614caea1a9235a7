"""Fakes of BigEarthNet v1 and v2.

v1: ``BigEarthNet-v1.0/<S2 patch>/<S2 patch>_B01.tif ... _B12.tif`` (uint16, 10 m: 120 px,
20 m: 60 px, 60 m: 20 px, UTM, nodata none) + ``<S2 patch>_labels_metadata.json`` (43-class
names, coordinates, projection, tile_source, acquisition_date);
``BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_VV.tif, _VH.tif`` (float32 dB, 120 px) + its JSON
with ``corresponding_s2_patch``; the official split files ``train.csv``, ``val.csv``,
``test.csv`` (one S2 patch name a line).

v2: ``metadata.parquet`` (patch_id, labels as 19-class names, split train / validation / test,
country, s1_name), ``BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B01.tif ...``,
``BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_VV.tif, _VH.tif``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from affine import Affine

from fakes.common import write_tif

S2_BANDS = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
    "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}  # fmt: skip
LABELS_V1 = [
    ["Non-irrigated arable land", "Pastures"],
    ["Coniferous forest", "Mixed forest", "Water bodies"],
    ["Discontinuous urban fabric", "Industrial or commercial units", "Sea and ocean"],
    ["Broad-leaved forest", "Transitional woodland/shrub", "Airports"],
    ["Peatbogs", "Natural grassland", "Vineyards"],
]
X0, Y0 = 404_400.0, 5_342_400.0


def _s2(folder: Path, name: str, k: int, x0: float) -> None:
    yy, xx = np.mgrid[0:120, 0:120]
    for j, (band, gsd) in enumerate(S2_BANDS.items()):
        f = gsd // 10
        v = 300 + 150 * j + 100 * k + 50 * np.sin((yy + xx) / 11.0)
        write_tif(
            folder / f"{name}_{band}.tif",
            v[::f, ::f].astype(np.uint16),
            crs="EPSG:32633",
            transform=Affine(gsd, 0, x0, 0, -gsd, Y0),
        )


def _s1(folder: Path, name: str, k: int, x0: float) -> None:
    yy, xx = np.mgrid[0:120, 0:120]
    for band, base in (("VV", -11.0), ("VH", -18.0)):
        v = base + k + 2 * np.cos((yy - xx) / 13.0)
        write_tif(
            folder / f"{name}_{band}.tif",
            v.astype(np.float32),
            crs="EPSG:32633",
            transform=Affine(10, 0, x0, 0, -10, Y0),
        )


def make_bigearthnet_v1(root: Path) -> Path:
    splits = {"train": [], "val": [], "test": []}
    for k, labels in enumerate(LABELS_V1):
        x0 = X0 + 1200 * k
        s2 = f"S2A_MSIL2A_20170613T101031_{k}_{48 + k}"
        s1 = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{k}_{48 + k}"
        d2, d1 = root / "BigEarthNet-v1.0" / s2, root / "BigEarthNet-S1-v1.0" / s1
        _s2(d2, s2, k, x0)
        _s1(d1, s1, k, x0)
        coords = {"ulx": x0, "uly": Y0, "lrx": x0 + 1200, "lry": Y0 - 1200}
        (d2 / f"{s2}_labels_metadata.json").write_text(
            json.dumps(
                {
                    "labels": labels,
                    "coordinates": coords,
                    "projection": "EPSG:32633",
                    "tile_source": "S2A_MSIL1C_20170613T101031_N0205_R022_T33UUP_20170613T101608.SAFE",
                    "acquisition_date": "2017-06-13 10:10:31",
                }
            )
        )
        (d1 / f"{s1}_labels_metadata.json").write_text(
            json.dumps(
                {
                    "labels": labels,
                    "coordinates": coords,
                    "projection": "EPSG:32633",
                    "corresponding_s2_patch": s2,
                    "scene_source": "S1A_IW_GRDH_1SDV_20170613T165043",
                    "acquisition_time": "2017-06-13T16:50:43",
                }
            )
        )
        splits[("train", "train", "train", "val", "test")[k]].append(s2)
    for s, names in splits.items():
        (root / f"{s}.csv").write_text("\n".join(names) + "\n")
    return root


LABELS_V2 = [
    ["Arable land", "Pastures"],
    ["Coniferous forest", "Mixed forest", "Inland waters"],
    ["Urban fabric", "Industrial or commercial units", "Marine waters"],
    ["Broad-leaved forest", "Transitional woodland, shrub"],
    ["Inland wetlands", "Natural grassland and sparsely vegetated areas"],
]


def make_bigearthnet_v2(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    tile = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
    s1_product = "S1B_IW_GRDH_1SDV_20170612T165809_33UUP"
    for k, labels in enumerate(LABELS_V2):
        x0 = X0 + 1200 * k
        pid, s1 = f"{tile}_{51 + k}_{83 - k}", f"{s1_product}_{51 + k}_{83 - k}"
        _s2(root / "BigEarthNet-S2" / tile / pid, pid, k, x0)
        _s1(root / "BigEarthNet-S1" / s1_product / s1, s1, k, x0)
        split = ("train", "train", "train", "validation", "test")[k]
        rows.append(
            {"patch_id": pid, "labels": labels, "split": split, "country": "Austria",
             "s1_name": s1, "contains_seasonal_snow": False, "contains_cloud_or_shadow": False}
        )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata.parquet")
    return root

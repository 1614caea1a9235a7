"""BigEarthNet: 1.2 km x 1.2 km patches with Sentinel-2 L2A (12 bands, one GeoTIFF per band at
10 / 20 / 60 m: 120 / 60 / 20 px) and Sentinel-1 (VV, VH in dB, 120 px), CORINE multi-labels.

v1 (Sumbul et al. 2019; BigEarthNet-MM 2021)::

    BigEarthNet-v1.0/<S2 patch>/<S2 patch>_B01.tif ... _B12.tif, _labels_metadata.json
    BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_VV.tif, _VH.tif, _labels_metadata.json
        (the S1 JSON names its S2 partner in "corresponding_s2_patch")
    train.csv, val.csv, test.csv   the official split: one S2 patch name a line (S1+S2 lists:
                                   "S2 name,S1 name")

The labels are the 43 CORINE level-3 names; ``nomenclature=19`` (default) maps them onto the 19
classes of Sumbul et al. 2020 (11 of the 43 map to none and are dropped).

v2 (reBEN, Clasen et al. 2024)::

    metadata.parquet               patch_id, labels (19-class names), split
                                   (train / validation / test), s1_name, ...
    BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B01.tif ... _B12.tif
    BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_VV.tif, _VH.tif

``<tile>`` is the patch id without its two trailing grid numbers (likewise for S1).
An item: ``s2`` (1, 10, 120, 120) and/or ``s1`` (1, 2, 120, 120) single-step series with their
day of year (from the file names), ``latlon`` of the patch centre, ``label`` (K,) multi-hot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from skysense.data.datasets.base import DatasetError, RemoteSensingDataset, one_hot
from skysense.data.datasets.readers import (
    S2_L2A_ORDER,
    check_range,
    day_of_year,
    latlon_of,
    modality_sample,
)

log = logging.getLogger(__name__)

LABELS_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons",
    "Estuaries", "Sea and ocean",
)  # fmt: skip
LABELS_19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
    "Pastures", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
    "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters",
)  # fmt: skip
# Index of the 19-class label of each 43-class label (None: dropped), Sumbul et al. 2020.
_TO_19 = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6,
    21: 7, 22: 8, 23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15,
    35: 16, 36: 16, 38: 17, 39: 17, 40: 18, 41: 18, 42: 18,
}  # fmt: skip


def to_19(labels_43) -> list[str]:
    """43-class names -> the sorted-unique 19-class names they map to."""
    out = set()
    for n in labels_43:
        if n not in LABELS_43:
            raise DatasetError(f"BigEarthNet label {n!r} is not one of the 43 CORINE labels")
        k = _TO_19.get(LABELS_43.index(n))
        if k is not None:
            out.add(LABELS_19[k])
    return sorted(out, key=LABELS_19.index)


def _seeded_split(names: list[str], split: str, val_fraction: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n_val = max(1, int(round(val_fraction * len(names)))) if len(names) > 1 else 0
    return sorted(order[:n_val]) if split in ("val", "test") else sorted(order[n_val:])


class _BigEarthNetBase(RemoteSensingDataset):
    task = "multilabel"
    sensors = {"s2": "s2_l2a", "s1": "s1_grd_db"}
    file_bands = {"s2": S2_L2A_ORDER, "s1": ("VV", "VH")}
    resolution = {"s2": 10.0, "s1": 10.0}
    crs = "UTM per patch; 20/60 m bands resampled onto the 10 m grid of B02; S1 on the same grid"

    def _read(self, folders: dict) -> dict:
        from skysense.data import io
        from skysense.data.geo import Grid
        from skysense.data.sensors import get_sensor

        sample: dict = {}
        grid = prof0 = None
        for m in self.modalities:
            folder = folders.get(m)
            if folder is None or not Path(folder).is_dir():
                raise FileNotFoundError(f"{self.name}: no {m.upper()} folder {folder}")
            spec = get_sensor(self.sensors[m])
            arr, prof = io.read_band_folder(folder, sensor=spec, resolution=10, grid=grid)
            check_range(prof["files"][0], arr, spec)
            if grid is None:
                grid = Grid(prof["crs"], prof["transform"], prof["height"], prof["width"])
                prof0 = prof
            sample.update(modality_sample(m, [arr], spec.name, [day_of_year(prof["date"])]))
        sample["latlon"] = latlon_of(prof0)
        return sample


class BigEarthNet(_BigEarthNetBase):
    """BigEarthNet v1 (see the module docstring).

    Args:
        modalities: ``[s2]``, ``[s1]`` or ``[s2, s1]``.
        nomenclature: 19 (default) or 43.
        val_fraction, seed: a seeded split of the patches found when the root has no official
            split files (the shared example patches).
    """

    name = "bigearthnet"
    classes = LABELS_19
    label_encoding = "<patch>_labels_metadata.json 'labels': 43 CORINE names (19 by mapping)"
    split_files = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
    layout = "root/BigEarthNet-v1.0/<S2 patch>/..., root/BigEarthNet-S1-v1.0/<S1 patch>/..., train/val/test.csv"

    def __init__(
        self,
        root,
        split: str = "train",
        split_file=None,
        modalities=("s2",),
        nomenclature: int = 19,
        val_fraction: float = 0.3,
        seed: int = 0,
    ):
        super().__init__(root, split, split_file, modalities)
        if nomenclature not in (19, 43):
            raise ValueError(f"bigearthnet: nomenclature must be 19 or 43, got {nomenclature}")
        self.nomenclature = nomenclature
        self.classes = LABELS_19 if nomenclature == 19 else LABELS_43
        listed = self.split_names()
        if listed is not None:
            self.items = self._from_split_file(listed)
        else:
            s2, s1 = self._scan()
            names = sorted(
                n
                for n in set(s2) | set(s1)
                if all((s2 if m == "s2" else s1).get(n) for m in self.modalities)
            )
            log.warning(
                "bigearthnet: no official split file (train.csv, val.csv, test.csv) under %s; "
                "a seeded split (val_fraction=%s, seed=%d) of the %d patches found",
                self.root, val_fraction, seed, len(names),
            )  # fmt: skip
            chosen = _seeded_split(names, split, val_fraction, seed)
            self.items = [{"name": n, "s2": s2.get(n), "s1": s1.get(n)} for n in chosen]

    def _tops(self, s1: bool) -> list[Path]:
        return [
            d
            for d in sorted(self.root.iterdir())
            if d.is_dir() and d.name.startswith("BigEarthNet") and (("S1" in d.name) == s1)
        ]

    def _scan(self) -> tuple[dict, dict]:
        """Patch folders by S2 name: every ``*_labels_metadata.json`` under root (S1 folders
        keyed by the S2 patch their JSON names)."""
        s2, s1 = {}, {}
        for meta in sorted(self.root.rglob("*_labels_metadata.json")):
            d = json.loads(meta.read_text())
            if "corresponding_s2_patch" in d:
                s1[d["corresponding_s2_patch"]] = meta.parent
            else:
                s2[meta.parent.name] = meta.parent
        if not s2 and not s1:
            raise FileNotFoundError(f"bigearthnet: no *_labels_metadata.json under {self.root}")
        return s2, s1

    def _from_split_file(self, listed: list[str]) -> list[dict]:
        """Items of an official split file, their folders found by name (no scan of the
        590,326 patches): ``S2 name`` or ``S2 name,S1 name`` a line."""
        rows = [[c.strip() for c in ln.split(",")] for ln in listed]
        s2_tops, s1_tops = self._tops(False), self._tops(True)
        s1_of = None
        if "s1" in self.modalities and any(len(r) < 2 for r in rows):
            s1_of = self._scan()[1]  # the S1 partner is named only in the S1 JSONs
        items = []
        for r in rows:
            n = r[0]
            it = {"name": n, "s2": None, "s1": None}
            it["s2"] = next((t / n for t in s2_tops if (t / n).is_dir()), None)
            if "s1" in self.modalities:
                it["s1"] = (
                    next((t / r[1] for t in s1_tops if (t / r[1]).is_dir()), None)
                    if len(r) > 1
                    else s1_of.get(n)
                )
            missing = [m for m in self.modalities if it[m] is None]
            if missing:
                raise DatasetError(
                    f"bigearthnet {self.split}: patch {n} of the split file has no "
                    f"{'/'.join(m.upper() for m in missing)} folder under {self.root}"
                )
            items.append(it)
        return items

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        folder = Path(it["s2"] or it["s1"])
        meta = folder / f"{folder.name}_labels_metadata.json"
        if not meta.is_file():
            raise FileNotFoundError(f"bigearthnet: no {meta}")
        try:
            labels = json.loads(meta.read_text()).get("labels")
        except ValueError as e:
            raise DatasetError(f"{meta}: unreadable JSON ({e})") from None
        if not isinstance(labels, list):
            raise DatasetError(f"{meta}: 'labels' must be a list of class names")
        if self.nomenclature == 19:
            labels = to_19(labels)
        s = self._read({m: it[m] for m in self.modalities})
        s["label"] = one_hot(labels, self.classes, str(meta))
        return s


class BigEarthNetV2(_BigEarthNetBase):
    """BigEarthNet v2 / reBEN (see the module docstring): the split and the 19-class labels
    from ``metadata.parquet`` (pyarrow reads it)."""

    name = "bigearthnet_v2"
    classes = LABELS_19
    label_encoding = "metadata.parquet 'labels': 19-class names"
    split_files = {
        "train": "metadata.parquet",
        "val": "metadata.parquet",
        "test": "metadata.parquet",
    }
    layout = "root/metadata.parquet, root/BigEarthNet-S2/<tile>/<patch_id>/..., root/BigEarthNet-S1/<product>/<s1_name>/..."

    _SPLIT = {"train": "train", "val": "validation", "test": "test"}

    def __init__(self, root, split="train", split_file=None, modalities=("s2",)):
        super().__init__(root, split, split_file, modalities)
        meta = self.root / "metadata.parquet"
        if not meta.is_file():
            raise FileNotFoundError(f"bigearthnet_v2: no {meta} (expected layout: {self.layout})")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                "bigearthnet_v2 reads metadata.parquet with pyarrow: pip install pyarrow"
            ) from None
        table = pq.read_table(meta).to_pylist()
        need = {"patch_id", "labels", "split"} | ({"s1_name"} if "s1" in self.modalities else set())
        missing = need - set(table[0]) if table else need
        if missing:
            raise DatasetError(f"{meta}: columns {sorted(missing)} missing")
        if self.split_file is not None:
            wanted = set(self.split_names() or [])
            rows = [r for r in table if r["patch_id"] in wanted]
        else:
            names = {self._SPLIT[split], split}
            rows = [r for r in table if r["split"] in names]
        self.items = [
            {"name": r["patch_id"], "labels": list(r["labels"]), "s1": r.get("s1_name")}
            for r in rows
        ]

    @staticmethod
    def _folder(top: Path, name: str) -> Path:
        return top / name.rsplit("_", 2)[0] / name

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        folders = {
            "s2": self._folder(self.root / "BigEarthNet-S2", it["name"]),
            "s1": self._folder(self.root / "BigEarthNet-S1", it["s1"]) if it["s1"] else None,
        }
        s = self._read(folders)
        s["label"] = one_hot(it["labels"], self.classes, f"metadata.parquet {it['name']}")
        return s

"""Scene classification from class folders: ``root/<class>/<image>``, the class the folder's name.

- :class:`ClassFolders` (``data=class_folders``): any such tree; the sensor is found from each
  image's bands (``sensor=auto``) or declared, and a mismatch is a one-line error.
- :class:`EuroSATMS` / :class:`EuroSATRGB` (Helber et al. 2019): 27,000 Sentinel-2 patches of
  64 x 64 px at 10 m in 10 classes. MS: 13-band uint16 GeoTIFFs (UTM) storing B01..B12 and then
  B8A last; RGB: JPEGs. Splits: ``eurosat-{train,val,test}.txt`` (the split files TorchGeo
  distributes, one file name a line) where present.
- :class:`AID` (Xia et al. 2017): 10,000 RGB JPEGs of 600 x 600 px in 30 classes.
- :class:`RESISC45` (Cheng et al. 2017): 31,500 RGB JPEGs of 256 x 256 px in 45 classes; splits
  ``resisc45-{train,val,test}.txt`` where present.

Without split files the split is drawn per class from a generator seeded with ``seed``:
``val_fraction`` and ``test_fraction`` of each class's images (AID and RESISC-45 have no
official split; the paper reports training ratios, set with ``train_fraction``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skysense.data.datasets.base import DatasetError, RemoteSensingDataset, read_lines
from skysense.data.datasets.readers import (
    BAND_ORDERS,
    EUROSAT_MS_ORDER,
    _open,
    file_band_names,
    latlon_of,
    modality_sample,
    read_image,
    sensor_for,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2")


def split_per_class(items, fractions: Sequence[float], seed: int) -> list[list]:
    """Items -> len(fractions) + 1 lists: per class, after a seeded shuffle, the first
    ``round(f * n)`` for each fraction (at least 1 when the class has more than one item), the
    rest in the last list."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for it in items:
        by_class.setdefault(it["label"], []).append(it)
    out: list[list] = [[] for _ in range(len(fractions) + 1)]
    for k in sorted(by_class):
        its = by_class[k]
        order = list(rng.permutation(len(its)))
        for j, f in enumerate(fractions):
            n = max(1, int(round(f * len(its)))) if (f > 0 and len(order) > 1) else 0
            out[j] += [its[q] for q in order[:n]]
            order = order[n:]
        out[-1] += [its[q] for q in order]
    return out


class ClassFolders(RemoteSensingDataset):
    """``root/<class>/<image>`` (GeoTIFF, PNG, JPEG).

    Args:
        sensor: ``auto`` (from the first image's bands: descriptions, else its profile) or a
            sensor name; every image is checked against it.
        band_order: the band names of files without band descriptions, in file order, or a
            known order's name (``eurosat``, ``s2_l1c``, ``s2_l2a``).
        size: resize HR images to ``size`` x ``size`` (bilinear; None: as they are).
        ms_size: the same for Sentinel images (None, the default: their 10 m pixels as they
            are; resampling changes the ground sampling the S2 / S1 encoders expect).
        val_fraction, test_fraction, seed: the per-class split when no split file exists.
        val_root: a separate tree for the ``val`` split (same classes).
    """

    name = "class_folders"
    task = "classification"
    sensors = {"hr": "hr_rgb"}
    crs = "ignored: a scene label needs no georeference (lat/lon kept where present)"
    label_encoding = "the image's folder name"
    layout = "root/<class>/<image>.{tif,png,jpg}"
    declared_classes: tuple[str, ...] = ()
    subfolders: tuple[str, ...] = ()
    train_fraction: float | None = None

    def __init__(
        self,
        root,
        split: str = "train",
        split_file=None,
        sensor: str = "auto",
        band_order=None,
        size: int | None = None,
        ms_size: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        train_fraction: float | None = None,
        seed: int = 0,
        val_root=None,
    ):
        super().__init__(root, split, split_file)
        self.top = self.root
        if val_root and split == "val":
            self.top = Path(val_root)
        self.top = self._find_top(self.top)
        if isinstance(band_order, str):
            if band_order not in BAND_ORDERS:
                raise ValueError(f"band_order {band_order!r}: known {sorted(BAND_ORDERS)}")
            band_order = BAND_ORDERS[band_order]
        self.band_order = tuple(band_order) if band_order else self._default_order()
        self.size, self.ms_size = size, ms_size
        items, self.classes = self._scan()
        names = self.split_names()
        if val_root:
            chosen = items
        elif names is not None:
            stems = [Path(n).stem for n in names]
            chosen = self.select(items, lambda it: it["name"], stems)
        else:
            tf = train_fraction if train_fraction is not None else self.train_fraction
            if tf is not None:
                tr, rest = split_per_class(items, [tf], seed)
                parts = {"train": tr, "val": rest, "test": rest}
            else:
                val, test, tr = split_per_class(items, [val_fraction, test_fraction], seed)
                parts = {"train": tr, "val": val, "test": test or val}
            chosen = parts[split]
        self.items = chosen
        if not self.items:
            raise DatasetError(f"{self.name}: no image in the {split} split under {self.top}")
        self.sensor = self._detect(sensor)
        self.sensors = {get_modality(self.sensor): self.sensor}
        self.modalities = list(self.sensors)

    def _default_order(self):
        if "s2" in self.file_bands:
            return self.file_bands["s2"]
        top = self._find_top(self.top)
        folders = {p.name for p in top.iterdir() if p.is_dir()} if top.is_dir() else set()
        if folders and folders <= set(_EUROSAT_CLASSES):
            # EuroSAT's class names: its multispectral files store B8A last.
            return EUROSAT_MS_ORDER
        return None

    def _find_top(self, root: Path) -> Path:
        for sub in self.subfolders:
            if (root / sub).is_dir():
                return root / sub
        return root

    def _scan(self):
        top = self.top
        folders = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DatasetError(f"{self.name}: {top} has no class folder (layout: {self.layout})")
        if self.declared_classes:
            classes = list(self.declared_classes)
            unknown = [f for f in folders if f not in classes]
            if unknown:
                raise DatasetError(
                    f"{self.name}: folders {unknown} under {top} are not classes of {self.name}"
                )
        else:
            classes = folders
        items = []
        for c in folders:
            files = sorted(p for p in (top / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"{self.name}: class folder {top / c} holds no image")
            items += [{"name": p.stem, "path": p, "label": classes.index(c)} for p in files]
        return items, classes

    def _detect(self, sensor: str) -> str:
        first = self.items[0]["path"]
        if sensor and sensor != "auto":
            return sensor
        with _open(first) as ds:
            names = file_band_names(ds, self._declared_for(ds))
            found = sensor_for(names, ds.dtypes[0])
        if found is None:
            raise DatasetError(
                f"{first}: bands {' '.join(names)} name no known sensor; set data.sensor"
            )
        log.info("%s: %s images (bands %s, from %s)", self.name, found, names, first.name)
        return found

    def _declared_for(self, ds):
        if self.band_order and ds.count == len(self.band_order):
            return self.band_order
        return None

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        with _open(it["path"]) as ds:
            declared = self._declared_for(ds)
        arr, sensor, prof = read_image(it["path"], self.sensor, declared, return_profile=True)
        m = get_modality(sensor)
        s = modality_sample(m, [arr], sensor, [0])
        size = self.size if m == "hr" else self.ms_size
        if size is not None:
            s.pop(f"{m}_pixel_valid", None)  # the same keys for every item, resized or not
            if tuple(arr.shape[-2:]) != (size, size):
                x = s[m] if m == "hr" else s[m][0]
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
                s[m] = x if m == "hr" else x[None]
        s.pop("hr_pixel_valid", None)
        if m != "hr":
            s["latlon"] = latlon_of(prof)
        s["label"] = torch.tensor(it["label"], dtype=torch.int64)
        return s


def get_modality(sensor: str) -> str:
    from skysense.data.sensors import get_sensor

    return get_sensor(sensor).modality


_EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip


class EuroSATMS(ClassFolders):
    name = "eurosat_ms"
    sensors = {"s2": "s2_l1c"}
    file_bands = {"s2": EUROSAT_MS_ORDER}
    resolution = {"s2": 10.0}
    crs = "UTM per patch (EPSG:326xx/327xx); lat/lon of the patch centre kept"
    label_encoding = "the image's folder name; files <Class>_<n>.tif, 64 x 64 uint16, 13 bands"
    split_files = {s: f"eurosat-{s}.txt" for s in ("train", "val", "test")}
    layout = "root/[EuroSAT_MS|ds/images/remote_sensing/otherDatasets/sentinel_2/tif]/<Class>/<Class>_<n>.tif"
    declared_classes = _EUROSAT_CLASSES
    classes = _EUROSAT_CLASSES
    subfolders = ("EuroSAT_MS", "ds/images/remote_sensing/otherDatasets/sentinel_2/tif", "tif")

    def __init__(self, root, split="train", split_file=None, sensor="s2_l1c", **kw):
        super().__init__(root, split, split_file, sensor=sensor, **kw)


class EuroSATRGB(ClassFolders):
    name = "eurosat_rgb"
    sensors = {"hr": "hr_rgb"}
    resolution = {"hr": 10.0}
    crs = "none (JPEG)"
    label_encoding = "the image's folder name; files <Class>_<n>.jpg, 64 x 64 RGB"
    split_files = {s: f"eurosat-{s}.txt" for s in ("train", "val", "test")}
    layout = "root/[2750|EuroSAT|EuroSAT_RGB]/<Class>/<Class>_<n>.jpg"
    declared_classes = _EUROSAT_CLASSES
    classes = _EUROSAT_CLASSES
    subfolders = ("2750", "EuroSAT", "EuroSAT_RGB")

    def __init__(self, root, split="train", split_file=None, sensor="hr_rgb", **kw):
        super().__init__(root, split, split_file, sensor=sensor, **kw)


_AID_CLASSES = (
    "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church", "Commercial",
    "DenseResidential", "Desert", "Farmland", "Forest", "Industrial", "Meadow",
    "MediumResidential", "Mountain", "Park", "Parking", "Playground", "Pond", "Port",
    "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square", "Stadium",
    "StorageTanks", "Viaduct",
)  # fmt: skip


class AID(ClassFolders):
    name = "aid"
    sensors = {"hr": "hr_rgb"}
    resolution = {"hr": None}
    crs = "none (JPEG); 0.5-8 m per pixel"
    label_encoding = "the image's folder name; files <class>_<n>.jpg, 600 x 600 RGB"
    split_files = {s: f"aid-{s}.txt" for s in ("train", "val", "test")}
    layout = "root/[AID]/<Class>/<class>_<n>.jpg"
    declared_classes = _AID_CLASSES
    classes = _AID_CLASSES
    subfolders = ("AID",)
    # The paper's protocols train on 20 % or 50 % of each class and test on the rest.
    train_fraction = 0.2

    def __init__(self, root, split="train", split_file=None, sensor="hr_rgb", **kw):
        super().__init__(root, split, split_file, sensor=sensor, **kw)


_RESISC_CLASSES = tuple(
    [
        "airplane",
        "airport",
        "baseball_diamond",
        "basketball_court",
        "beach",
        "bridge",
        "chaparral",
        "church",
        "circular_farmland",
        "cloud",
        "commercial_area",
        "dense_residential",
        "desert",
        "forest",
        "freeway",
        "golf_course",
        "ground_track_field",
        "harbor",
        "industrial_area",
        "intersection",
        "island",
        "lake",
        "meadow",
        "medium_residential",
        "mobile_home_park",
        "mountain",
        "overpass",
        "palace",
        "parking_lot",
        "railway",
        "railway_station",
        "rectangular_farmland",
        "river",
        "roundabout",
        "runway",
        "sea_ice",
        "ship",
        "snowberg",
        "sparse_residential",
        "stadium",
        "storage_tank",
        "tennis_court",
        "terrace",
        "thermal_power_station",
        "wetland",
    ]
)


class RESISC45(ClassFolders):
    name = "resisc45"
    sensors = {"hr": "hr_rgb"}
    resolution = {"hr": None}
    crs = "none (JPEG); 0.2-30 m per pixel"
    label_encoding = "the image's folder name; files <class>_<nnn>.jpg, 256 x 256 RGB"
    split_files = {s: f"resisc45-{s}.txt" for s in ("train", "val", "test")}
    layout = "root/[NWPU-RESISC45]/<class>/<class>_<nnn>.jpg"
    declared_classes = _RESISC_CLASSES
    classes = _RESISC_CLASSES
    subfolders = ("NWPU-RESISC45",)
    # The paper's protocols train on 10 % or 20 % of each class.
    train_fraction = 0.2

    def __init__(self, root, split="train", split_file=None, sensor="hr_rgb", **kw):
        super().__init__(root, split, split_file, sensor=sensor, **kw)


__all__ = ["AID", "ClassFolders", "EuroSATMS", "EuroSATRGB", "RESISC45", "read_lines"]

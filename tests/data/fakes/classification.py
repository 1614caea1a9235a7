"""Fakes of the class-folder datasets.

- EuroSAT MS: ``EuroSAT_MS/<Class>/<Class>_<n>.tif``, 64 x 64 uint16, 13 bands stored B01..B12
  then B8A, no band descriptions (as distributed), UTM CRS at 10 m; band ``j`` of the file holds
  ``1000 + 100 j`` plus a class offset, so a reader that takes bands by position is caught.
  Split files ``eurosat-{train,val,test}.txt`` list ``<Class>_<n>.jpg`` (as TorchGeo's do).
- EuroSAT RGB: ``2750/<Class>/<Class>_<n>.jpg`` 64 x 64 RGB JPEGs, the same split files.
- AID: ``AID/<Class>/<class>_<n>.jpg`` (lower-case file prefix as distributed), 64 px here
  instead of 600.
- RESISC-45: ``NWPU-RESISC45/<class>/<class>_<nnn>.jpg``, 64 px here instead of 256, with
  ``resisc45-{train,val,test}.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine

from fakes.common import smooth_rgb, write_image, write_tif

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "River")
EUROSAT_FILE_ORDER = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A",
)  # fmt: skip


def eurosat_value(band: str, class_index: int) -> int:
    """The value the fake EuroSAT MS writes into ``band`` of a class's images."""
    return 1000 + 100 * EUROSAT_FILE_ORDER.index(band) + 37 * class_index


def _splits(names: list[str], root: Path, prefix: str, suffix: str = ".jpg") -> None:
    # Per class: the first image trains, the second validates, the third tests.
    parts = {"train": [], "val": [], "test": []}
    for n in names:
        k = int(n.rsplit("_", 1)[1].split(".")[0])
        parts[("train", "val", "test")[(k - 1) % 3]].append(Path(n).stem + suffix)
    for s, lines in parts.items():
        (root / f"{prefix}-{s}.txt").write_text("\n".join(lines) + "\n")


def make_eurosat_ms(root: Path, n: int = 3, descriptions: bool = False) -> Path:
    top = root / "EuroSAT_MS"
    names = []
    t = Affine(10.0, 0, 500_000.0, 0, -10.0, 5_300_000.0)
    yy, xx = np.mgrid[0:64, 0:64]
    for k, c in enumerate(EUROSAT_CLASSES):
        for i in range(1, n + 1):
            arr = np.stack(
                [
                    np.full((64, 64), eurosat_value(b, k)) + (yy + xx + 5 * i) % 7
                    for b in EUROSAT_FILE_ORDER
                ]
            ).astype(np.uint16)
            name = f"{c}_{i}.tif"
            write_tif(
                top / c / name,
                arr,
                crs="EPSG:32631",
                transform=t,
                descriptions=[f"B{b[1:].zfill(2)}" for b in EUROSAT_FILE_ORDER]
                if descriptions
                else None,
            )
            names.append(name)
    _splits(names, root, "eurosat")
    return root


def make_eurosat_rgb(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    names = []
    for k, c in enumerate(EUROSAT_CLASSES):
        for i in range(1, n + 1):
            name = f"{c}_{i}.jpg"
            write_image(root / "2750" / c / name, smooth_rgb(rng, 64, 60 + 60 * k))
            names.append(name)
    _splits(names, root, "eurosat")
    return root


def make_aid(root: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(1)
    for k, c in enumerate(("Airport", "Beach", "Forest")):
        for i in range(1, n + 1):
            write_image(root / "AID" / c / f"{c.lower()}_{i}.jpg", smooth_rgb(rng, 64, 60 + 60 * k))
    return root


def make_resisc45(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(2)
    names = []
    for k, c in enumerate(("airplane", "beach", "sea_ice")):
        for i in range(1, n + 1):
            name = f"{c}_{i:03d}.jpg"
            write_image(root / "NWPU-RESISC45" / c / name, smooth_rgb(rng, 64, 60 + 60 * k))
            names.append(name)
    _splits(names, root, "resisc45")
    return root


FMOW_ROWS = [
    ("train", "airport", 0, 0, "2017-06-03T10:20:31Z", (40, 44)),
    ("train", "airport", 0, 1, "2018-01-10T10:20:31Z", (40, 44)),
    ("train", "crop_field", 7, 0, "2016-09-12T10:20:31Z", (52, 48)),
    ("train", "zoo", 3, 2, "2019-03-01T10:20:31Z", (36, 36)),
    ("val", "zoo", 9, 0, "2017-07-15T10:20:31Z", (44, 40)),
    ("test", "crop_field", 11, 0, "2018-05-05T10:20:31Z", (48, 48)),
]


def make_fmow_s2(root: Path) -> Path:
    """fMoW-Sentinel: ``{train,val,test_gt}.csv`` and
    ``<split>/<category>/<category>_<loc>/<category>_<loc>_<img>.tif`` (13 uint16 bands in
    wavelength order B1..B8, B8A, B9..B12, no descriptions, UTM, sizes that differ); band j holds
    ``1000 + 100 j``."""
    header = "category,location_id,image_id,timestamp,polygon\n"
    lines = {"train": [], "val": [], "test": []}
    for split, c, loc, img, ts, (h, w) in FMOW_ROWS:
        arr = np.stack([np.full((h, w), 1000 + 100 * j) for j in range(13)]).astype(np.uint16)
        t = Affine(10.0, 0, 300_000.0 + 1000 * loc, 0, -10.0, 4_000_000.0)
        write_tif(root / split / c / f"{c}_{loc}" / f"{c}_{loc}_{img}.tif", arr, "EPSG:32618", t)
        lines[split].append(f'{c},{loc},{img},{ts},"POLYGON ((0 0, 1 0, 1 1, 0 0))"')
    for split, name in (("train", "train.csv"), ("val", "val.csv"), ("test", "test_gt.csv")):
        (root / name).write_text(header + "\n".join(lines[split]) + "\n")
    return root

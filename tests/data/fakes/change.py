"""Fakes of the change-detection datasets.

- OSCD: ``images/<city>/imgs_{1,2}/<product>_B01.tif ... _B8A.tif`` one uint16 GeoTIFF per band
  at native resolution (10 m: 48 px, 20 m: 24 px, 60 m: 8 px) in EPSG:4326, ``dates.txt``,
  ``images/{train,test}.txt`` (comma-separated cities), ``labels/<city>/cm/<city>-cm.tif``
  uint8 1 = no change / 2 = change without georeference. City ``bercy``'s date 2 lies on another
  grid (a finer pixel, shifted), as some distributed cities do.
- LEVIR-CD: ``{train,val,test}/{A,B,label}/<split>_<n>.png``, RGB PNGs and 0/255 labels
  (64 px here instead of 1024).
- WHU-CD (cut): ``{A,B,label}/<n>.png`` and ``list/{train,val,test}.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine

from fakes.common import smooth_rgb, write_image, write_tif

OSCD_BANDS = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
    "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip
DEG_PER_10M = 0.0001
OSCD_CITIES = {"aguasclaras": "train", "bercy": "train", "paris": "test"}


def oscd_band_value(band: str, date: int, row, col):
    """The digital number the fake writes (a band offset plus a smooth pattern)."""
    return 800 + 60 * list(OSCD_BANDS).index(band) + 150 * date + 40 * np.sin(row / 6 + col / 9)


def _write_date(folder: Path, prefix: str, date: int, x0: float, y0: float, px10: float, n10: int):
    for band, gsd in OSCD_BANDS.items():
        f = gsd // 10
        n = -(-n10 // f)
        px = px10 * f
        rows, cols = np.mgrid[0:n, 0:n] * f
        # The pattern is a function of ground position (in 10 m pixels of date 1's grid).
        gy = (y0 - (rows + 0.5 * f) * px10 - 45.0) / -DEG_PER_10M
        gx = (x0 + (cols + 0.5 * f) * px10 - 2.0) / DEG_PER_10M
        arr = oscd_band_value(band, date, gy, gx).astype(np.uint16)
        t = Affine(px, 0, x0, 0, -px, y0)
        write_tif(folder / f"{prefix}_{band}.tif", arr, crs="EPSG:4326", transform=t)


def make_oscd(root: Path, n10: int = 48) -> Path:
    images = root / "images"
    for k, (city, _) in enumerate(OSCD_CITIES.items()):
        c = images / city
        _write_date(c / "imgs_1", f"S2A_OPER_MSI_L1C_TL_SGS__201607{10 + k}T161632_A005768_T30SYJ",
                    1, 2.0, 45.0, DEG_PER_10M, n10)  # fmt: skip
        if city == "bercy":  # date 2 on another grid: 0.8 x the pixel, shifted by 0.3 px
            _write_date(c / "imgs_2", "T31UDQ_20171015T105021", 2, 2.0 - 0.3 * DEG_PER_10M,
                        45.0 + 0.3 * DEG_PER_10M, 0.8 * DEG_PER_10M, int(n10 / 0.8) + 2)  # fmt: skip
        else:
            _write_date(c / "imgs_2", "T31UDQ_20171015T105021", 2, 2.0, 45.0, DEG_PER_10M, n10)
        (c / "dates.txt").write_text(f"date_1: 201607{10 + k}\ndate_2: 20171015\n")
        cm = np.ones((n10, n10), np.uint8)
        cm[10:22, 12 + k : 26 + k] = 2
        write_tif(root / "labels" / city / "cm" / f"{city}-cm.tif", cm)
    for split in ("train", "test"):
        cities = [c for c, s in OSCD_CITIES.items() if s == split]
        (images / f"{split}.txt").write_text(",".join(cities))
    return root


def _pair(rng, size: int, k: int):
    a = smooth_rgb(rng, size, 80 + 20 * k)
    b = a.copy()
    lab = np.zeros((size, size), np.uint8)
    y, x = 8 + 4 * k, 10 + 3 * k
    b[y : y + 16, x : x + 20] = (200, 190, 180)  # a new roof
    lab[y : y + 16, x : x + 20] = 255
    return a, b, lab


def make_levir_cd(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(3)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for i in range(1, n + 1):
            a, b, lab = _pair(rng, size, i)
            name = f"{split}_{i}.png"
            write_image(root / split / "A" / name, a)
            write_image(root / split / "B" / name, b)
            write_image(root / split / "label" / name, lab)
    return root


def make_whu_cd(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(4)
    lists = {"train": [], "val": [], "test": []}
    for i in range(1, 7):
        a, b, lab = _pair(rng, size, i)
        name = f"{i}.png"
        for sub, img in (("A", a), ("B", b), ("label", lab)):
            write_image(root / sub / name, img)
        lists[("train", "train", "train", "val", "val", "test")[i - 1]].append(name)
    (root / "list").mkdir(parents=True, exist_ok=True)
    for s, names in lists.items():
        (root / "list" / f"{s}.txt").write_text("\n".join(names) + "\n")
    return root

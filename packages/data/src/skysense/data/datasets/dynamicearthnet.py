"""DynamicEarthNet (Toker et al., CVPR 2022): daily PlanetFusion images of 75 areas (1024 x
1024 px at 3 m, 2018-2019), monthly Sentinel-1 and Sentinel-2 composites, and monthly
land-cover labels; the paper's Dyna.-Pla (Planet), Dyna.-S2 (the S2 series) and Dyna.-MM
(Planet + S2 + S1).

Layout (the mediaTUM archives https://mediatum.ub.tum.de/1650201 extracted into one folder,
with the authors' split lists beside them, as their README asks)::

    planet/<zone>/<aoi>/<cube>/PF-SR/<YYYY-MM-DD>.tif      4 bands B G R NIR, reflectance
                                                           x 10000 (daily)
    labels/<cube>_<zone>/Labels/Raster/<id>/<id>-<YYYY>_<MM>_01.tif
                                                           7 bands, one per class, 255 where
                                                           the class is
    sentinel2/<cube>/<cube>_<YYYY>_<MM>.tif                monthly composite, 12 bands
    sentinel1/<cube>/<cube>_<YYYY>_<MM>.tif                monthly composite, 8 bands
    dynnet_training_splits/{train,val,test}.txt            (or <split>.txt at the root)
        "<planet dir> <label file> <YYYY-MM>" a line, paths from the root with a leading "/";
        the planet dir as the authors wrote it, /reprocess-cropped/UTM-24000/<zone>/...,
        is read as planet/<zone>/... (PANGAEA's reader does the same replacement)

Sources: the split-file folder and line format from the authors' loader (aysim/dynnet,
data/utae_dynamicen.py) and PANGAEA's (pangaea/datasets/utae_dynamicen.py); the label folder
``labels/<cube>_<zone>/``, the 12-channel S2 and 8-channel S1 GeoTIFFs and the S1 file name
``sentinel1/<cube>/<cube>_<YYYY>_<MM>.tif`` from TorchGeo's DynamicEarthNet reader and its
test-data generator. The S2 file is looked up the same way (a ``.tif`` under
``sentinel2/<cube>/`` whose name holds ``<YYYY>_<MM>`` or ``<YYYY>-<MM>``), since no public
source spells its name out.

Band order: the distribution does not document which 12 Sentinel-2 bands it holds nor in which
order (lukaskondmann/DENETHOR issue 8 asks and is unanswered). Twelve bands is the Level-2A set
(B1-B9, B8A, B11, B12, no B10), so that order is the default (``s2_bands``); band descriptions
in a file win over it, and ``s2_bands`` sets another order. The 8 Sentinel-1 channels are not
documented either: VV and VH are taken from the files' band descriptions, or from ``s1_bands``
(the 8 names in file order); without either, reading S1 is a one-line error saying so.

Months and labels: a label describes the first day of its month. ``s2`` / ``s1`` are series of
``months`` monthly composites ending with the label's month (oldest first; a month without a
file is left out, the label's own month must exist), each dated the 15th of its month. ``hr``
is the Planet image of the label's day (``day``, default the 1st), its B G R bands put in R G B
order by name and scaled to 8 bits with ``planet_scale`` (reflectance x 10000 at which 255 is
reached; a choice: 3000, i.e. 30 % reflectance, as true-colour composites are usually
stretched).

Grids: with ``hr`` alone the mask is on the label grid (3 m). With a Sentinel modality the
reference grid is the label grid coarsened by an integer factor ``f`` (the largest divisor of
the label's size not above the Sentinel pixel / label pixel ratio, 2 for 10 m over 3 m: a 6 m
grid; ``grid_factor`` sets it): the composites are resampled onto it (bilinear, NaN outside
their footprint), the mask is the majority class of each f x f block (snow & ice or no class:
ignored), and ``hr`` stays on the label grid, f times finer. SkySense fuses one S2 pixel with
8 x 8 HR pixels, so Planet + S2 (+ S1) runs with ``grid_factor=8`` (a 24 m S2 grid).

An item (``H`` x ``W`` the label grid, ``f`` the factor above, 1 without S2 / S1): ``hr`` (3, H,
W) float32 + ``hr_doy`` () int64; ``s2`` (T, 10, H/f, W/f) float32, ``s2_doy`` (T,) int64,
``s2_valid`` (T,) bool, ``s2_pixel_valid`` (T, H/f, W/f) bool; ``s1`` (T, 2, H/f, W/f) likewise;
``mask`` (H/f, W/f) int64 (255 = ignored); ``latlon`` (2,) float32; ``name``.

Classes: impervious surface, agriculture, forest & other vegetation, wetlands, soil, water;
the seventh label band (snow & ice) is ignored, as the authors' loader does.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from skysense.data.datasets.base import (
    IGNORE_INDEX,
    DatasetError,
    RemoteSensingDataset,
    read_lines,
)
from skysense.data.datasets.readers import (
    S2_L2A_ORDER,
    _canonical,
    _open,
    check_range,
    day_of_year,
    latlon_of,
    modality_sample,
    read_image,
)
from skysense.kernels.modalities import DEFAULT_SENSORS, SERIES

DEN_CLASSES = (
    "impervious surface", "agriculture", "forest & other vegetation", "wetlands", "soil",
    "water",
)  # fmt: skip
PLANET_BANDS = ("B", "G", "R", "NIR")
S1_CHANNELS = 8
_AUTHORS_PLANET_DIR = "/reprocess-cropped/UTM-24000/"
_FOLDERS = {"s2": "sentinel2", "s1": "sentinel1"}  # the composites' folders under root


def _month_shift(ym: str, back: int) -> str:
    y, m = (int(v) for v in ym.split("-"))
    k = y * 12 + (m - 1) - back
    return f"{k // 12:04d}-{k % 12 + 1:02d}"


def grid_factor(ratio: float, height: int, width: int) -> int:
    """The largest divisor of both ``height`` and ``width`` not above ``round(ratio)`` (>= 1)."""
    g, best = math.gcd(height, width), 1
    for d in range(1, max(1, round(ratio)) + 1):
        if g % d == 0:
            best = d
    return best


def block_majority(onehot: np.ndarray, f: int, n_classes: int) -> np.ndarray:
    """(K, H, W) one-hot label bands (255 = class) -> (H/f, W/f) int64: the class covering most
    of each f x f block; ``IGNORE_INDEX`` where that is a band beyond ``n_classes`` (snow &
    ice) or where no band is set."""
    k, h, w = onehot.shape
    count = (onehot == 255).reshape(k, h // f, f, w // f, f).sum(axis=(2, 4), dtype=np.int32)
    best = count.argmax(0)
    out = np.where((best < n_classes) & (count.max(0) > 0), best, IGNORE_INDEX)
    return out.astype(np.int64)


class DynamicEarthNet(RemoteSensingDataset):
    """Args: ``modalities``: any of ``hr`` (Planet), ``s2``, ``s1``; ``day``: day of the month
    of the Planet image; ``planet_scale``: see the module docstring; ``months``: length of the
    S2 / S1 series; ``s2_bands`` / ``s1_bands``: the band names of the composites in file order
    (see the module docstring); ``grid_factor``: the reference grid's pixel in label pixels
    (None: from the composites' resolution)."""

    name = "dynamicearthnet"
    task = "segmentation"
    sensors = dict(DEFAULT_SENSORS)
    file_bands = {
        "hr": PLANET_BANDS,
        "s2": S2_L2A_ORDER,
        "s1": tuple(f"undocumented {i + 1}" for i in range(S1_CHANNELS)),
    }
    resolution = {"hr": 3.0, "s2": 10.0, "s1": 10.0}
    crs = (
        "the Planet cubes' own (UTM); labels on the same 1024 x 1024 grid; S2 / S1 resampled onto "
        "the label grid coarsened by an integer factor"
    )
    classes = DEN_CLASSES
    label_encoding = "7-band label raster, band k = 255 where class k; band 7 (snow & ice) ignored"
    split_files = {s: f"dynnet_training_splits/{s}.txt" for s in ("train", "val", "test")}
    layout = (
        "root/dynnet_training_splits/<split>.txt ('<planet dir> <label file> <YYYY-MM>'), "
        "root/planet/<zone>/<aoi>/<cube>/PF-SR/<YYYY-MM-DD>.tif, root/labels/<cube>_<zone>/..., "
        "root/sentinel2/<cube>/<cube>_<YYYY>_<MM>.tif, root/sentinel1/<cube>/<cube>_<YYYY>_<MM>.tif"
    )

    def __init__(
        self,
        root,
        split="train",
        split_file=None,
        modalities=("hr",),
        day: int = 1,
        planet_scale: float = 3000.0,
        months: int = 1,
        s2_bands: Sequence[str] | None = None,
        s1_bands: Sequence[str] | None = None,
        grid_factor: int | None = None,
    ):
        super().__init__(root, split, split_file, modalities)
        # The mask lies on the coarsest grid read: put the Sentinel modalities first, so the
        # first modality is the reference grid.
        self.modalities = sorted(self.modalities, key=[*SERIES, "hr"].index)
        lines = self.split_names()
        if lines is None and (self.root / f"{split}.txt").is_file():
            lines = read_lines(self.root / f"{split}.txt")
        if lines is None:
            raise DatasetError(
                f"dynamicearthnet: no {self.root / self.split_files[split]} (the authors' split "
                "lists, dynnet_training_splits/)"
            )
        self.day, self.scale, self.months = int(day), float(planet_scale), max(1, int(months))
        self.s2_bands = tuple(s2_bands) if s2_bands else S2_L2A_ORDER
        self.s1_bands = tuple(s1_bands) if s1_bands else None
        if self.s1_bands is not None and len(self.s1_bands) != S1_CHANNELS:
            raise ValueError(f"dynamicearthnet: s1_bands names {len(self.s1_bands)} bands, not 8")
        self.factor = int(grid_factor) if grid_factor else None
        self.items = [self._item(ln) for ln in lines]

    def _item(self, line: str) -> dict:
        parts = line.split()
        if len(parts) != 3:
            raise DatasetError(
                f"dynamicearthnet {self.split} list: {line!r} is not '<planet dir> <label> "
                "<YYYY-MM>'"
            )
        planet, label, ym = parts
        if planet.startswith(_AUTHORS_PLANET_DIR):
            planet = "planet/" + planet[len(_AUTHORS_PLANET_DIR) :]
        pdir = self.root / planet.lstrip("/")
        cube = pdir.parent.name if pdir.name == "PF-SR" else pdir.name
        it = {
            "name": Path(label).stem,
            "image": pdir / f"{ym}-{self.day:02d}.tif",
            "label": self.root / label.lstrip("/"),
            "ym": ym,
            "cube": cube,
        }
        need = ["label"] + (["image"] if "hr" in self.modalities else [])
        for k in need:
            if not it[k].is_file():
                raise FileNotFoundError(f"dynamicearthnet {self.split}: {it[k]} is missing")
        # Each series' composites, oldest month first (None: no composite that month), looked up
        # once here rather than on every read.
        it["series"] = {}
        for m in (m for m in SERIES if m in self.modalities):
            months = [_month_shift(ym, back) for back in range(self.months - 1, -1, -1)]
            it["series"][m] = [(mo, self._composite(m, cube, mo)) for mo in months]
            if it["series"][m][-1][1] is None:
                raise FileNotFoundError(
                    f"dynamicearthnet {self.split}: no {m} composite of {ym} under "
                    f"{self.root / _FOLDERS[m] / cube} (expected {cube}_{ym.replace('-', '_')}.tif)"
                )
        return it

    def _composite(self, m: str, cube: str, ym: str) -> Path | None:
        folder = self.root / _FOLDERS[m] / cube
        exact = folder / f"{cube}_{ym.replace('-', '_')}.tif"
        if exact.is_file():
            return exact
        if not folder.is_dir():
            return None
        keys = (ym.replace("-", "_"), ym)
        hits = sorted(p for p in folder.glob("*.tif") if any(k in p.name for k in keys))
        return hits[0] if hits else None

    # ------------------------------------------------------------------ reading

    def _read_s1(self, path: Path) -> tuple[np.ndarray, dict]:
        """(2, h, w) float32 VV, VH of an 8-channel composite, and its grid."""
        from skysense.data.sensors import get_sensor

        spec = get_sensor(self.sensors["s1"])
        with _open(path) as ds:
            descs = [(_canonical(d) if d else None) for d in (ds.descriptions or ())]
            names = descs if descs and all(descs) else self.s1_bands
            if names is None:
                raise DatasetError(
                    f"{path}: {ds.count} Sentinel-1 channels without band descriptions; "
                    "DynamicEarthNet does not document them: set data.s1_bands to the "
                    f"{ds.count} names in file order (VV and VH among them)"
                )
            if len(names) != ds.count or "VV" not in names or "VH" not in names:
                raise DatasetError(
                    f"{path}: {ds.count} bands, s1_bands {' '.join(names)} must name each and "
                    "include VV and VH"
                )
            if ds.dtypes[0] not in spec.accepted_dtypes:
                raise DatasetError(f"{path}: dtype {ds.dtypes[0]} does not match {spec.name}")
            arr = ds.read([names.index("VV") + 1, names.index("VH") + 1]).astype(np.float32)
            if ds.nodata is not None and not np.isnan(ds.nodata):
                arr[:, (arr == np.float32(ds.nodata)).all(0)] = np.nan
            grid = {"crs": ds.crs, "transform": ds.transform}
        check_range(path, arr, spec)
        return arr, grid

    def _read_composite(self, m: str, path: Path) -> tuple[np.ndarray, dict]:
        if m == "s1":
            return self._read_s1(path)
        arr, _, prof = read_image(path, self.sensors["s2"], self.s2_bands, return_profile=True)
        return arr, {"crs": prof["crs"], "transform": prof["transform"]}

    def _target_grid(self, label_prof: dict, first: Path) -> tuple[int, dict]:
        """(f, grid of the label coarsened by f)."""
        from affine import Affine
        from rasterio.warp import transform_bounds

        h, w = label_prof["height"], label_prof["width"]
        f = self.factor
        if f is None:
            with _open(first) as ds:
                b = ds.bounds
                if ds.crs and label_prof["crs"] and ds.crs != label_prof["crs"]:
                    b = transform_bounds(ds.crs, label_prof["crs"], *b)
                px = (b[2] - b[0]) / ds.width
            f = grid_factor(px / abs(label_prof["transform"].a), h, w)
        if h % f or w % f:
            raise DatasetError(
                f"dynamicearthnet: grid_factor {f} does not divide the label's {h} x {w} px"
            )
        grid = {
            "crs": label_prof["crs"],
            "transform": label_prof["transform"] @ Affine.scale(f),
            "height": h // f,
            "width": w // f,
        }
        return f, grid

    def _series(self, m: str, it: dict, grid: dict) -> dict:
        from rasterio.warp import Resampling, reproject

        arrays, doys = [], []
        for ym, path in it["series"][m]:
            if path is None:
                continue  # a month before the archive or without a composite
            src, sg = self._read_composite(m, path)
            out = np.full((src.shape[0], grid["height"], grid["width"]), np.nan, np.float32)
            reproject(
                src, out, src_transform=sg["transform"], src_crs=sg["crs"] or grid["crs"],
                dst_transform=grid["transform"], dst_crs=grid["crs"], src_nodata=np.nan,
                dst_nodata=np.nan, resampling=Resampling.bilinear,
            )  # fmt: skip
            y, mo = (int(v) for v in ym.split("-"))
            arrays.append(out)
            doys.append(day_of_year(dt.date(y, mo, 15)))
        return modality_sample(m, arrays, self.sensors[m], doys)

    def _planet(self, it: dict) -> np.ndarray:
        with _open(it["image"]) as ds:
            if ds.count != 4:
                raise DatasetError(
                    f"{it['image']}: {ds.count} bands, expected 4 (B G R NIR PlanetFusion)"
                )
            bgr = ds.read([1, 2, 3]).astype(np.float32)
        return np.clip(bgr[::-1] / self.scale * 255.0, 0, 255)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        with _open(it["label"]) as ds:
            if ds.count != 7:
                raise DatasetError(f"{it['label']}: {ds.count} bands, expected 7 (one per class)")
            lab = ds.read()
            lprof = {"crs": ds.crs, "transform": ds.transform, "height": ds.height,
                     "width": ds.width}  # fmt: skip
        s: dict = {}
        y, m = (int(v) for v in it["ym"].split("-"))
        if "hr" in self.modalities:
            rgb = self._planet(it)
            if lab.shape[1:] != rgb.shape[1:]:
                raise DatasetError(f"{it['label']}: {lab.shape[1:]} px, image {rgb.shape[1:]}")
            doy = day_of_year(dt.date(y, m, self.day))
            s.update(modality_sample("hr", [rgb], "hr_rgb", [doy]))
            s.pop("hr_pixel_valid")
            s["hr_doy"] = torch.tensor(doy, dtype=torch.int64)
        sentinel = [mod for mod in self.modalities if mod in SERIES]
        f = 1
        if sentinel:
            first = it["series"][sentinel[0]][-1][1]  # the label month's composite
            f, grid = self._target_grid(lprof, first)
            for mod in sentinel:
                s.update(self._series(mod, it, grid))
        s["mask"] = torch.from_numpy(block_majority(lab, f, len(self.classes)))
        s["latlon"] = latlon_of(lprof)
        s["name"] = it["name"]
        return s

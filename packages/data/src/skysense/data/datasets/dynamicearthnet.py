"""DynamicEarthNet (Toker et al., CVPR 2022), the Planet part (the paper's Dyna.-Pla): daily
PlanetFusion images of 75 areas (1024 x 1024 px at 3 m, 2018-2019) and monthly land-cover labels.

Layout (the authors' distribution with their split lists)::

    <planet dir>/PF-SR/<YYYY-MM-DD>.tif     4 bands B G R NIR, surface reflectance x 10000
    <label dir>/...-<YYYY>_<MM>_01.tif      7 bands, one per class, 255 where the class is
    train.txt, val.txt, test.txt            "<planet dir> <label file> <YYYY-MM>" a line
                                            (paths from the root, leading "/")

Classes: impervious surface, agriculture, forest & other vegetation, wetlands, soil, water;
the seventh band (snow & ice) is ignored, as the authors' loader does. An item: ``hr`` (3, H, W)
from the Planet image of the label's day (``day``, default the 1st: the labels describe the
month's first day), its B G R bands put in R G B order by name and scaled to 8 bits with
``planet_scale`` (reflectance x 10000 at which 255 is reached; a choice: 3000, i.e. 30 %
reflectance, as true-colour composites are usually stretched), and ``mask`` (H, W).

The monthly Sentinel-1 / Sentinel-2 composites (Dyna.-S2, Dyna.-MM) are not read yet: the
split lists do not name them (``modalities`` other than hr raise NotImplementedError).
"""

from __future__ import annotations

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import _open, latlon_of, modality_sample

DEN_CLASSES = (
    "impervious surface", "agriculture", "forest & other vegetation", "wetlands", "soil",
    "water",
)  # fmt: skip
PLANET_BANDS = ("B", "G", "R", "NIR")


class DynamicEarthNet(RemoteSensingDataset):
    name = "dynamicearthnet"
    task = "segmentation"
    sensors = {"hr": "hr_rgb"}
    file_bands = {"hr": PLANET_BANDS}
    resolution = {"hr": 3.0}
    crs = "the Planet cubes' own (UTM); labels on the same 1024 x 1024 grid"
    classes = DEN_CLASSES
    label_encoding = "7-band label raster, band k = 255 where class k; band 7 (snow & ice) ignored"
    split_files = {s: f"{s}.txt" for s in ("train", "val", "test")}
    layout = (
        "root/<split>.txt ('<planet dir> <label file> <YYYY-MM>'), <planet dir>/<YYYY-MM-DD>.tif"
    )

    def __init__(
        self,
        root,
        split="train",
        split_file=None,
        modalities=("hr",),
        day: int = 1,
        planet_scale: float = 3000.0,
    ):
        if any(m != "hr" for m in modalities):
            raise NotImplementedError(
                "dynamicearthnet: only the Planet images (hr) are read; the monthly S1 / S2 "
                "composites are not"
            )
        super().__init__(root, split, split_file, modalities)
        lines = self.split_names()
        if lines is None:
            raise DatasetError(f"dynamicearthnet: no {self.root / self.split_files[split]}")
        self.day, self.scale = int(day), float(planet_scale)
        self.items = []
        for ln in lines:
            parts = ln.split()
            if len(parts) != 3:
                raise DatasetError(
                    f"dynamicearthnet {split} list: {ln!r} is not '<planet dir> <label> <YYYY-MM>'"
                )
            planet, label, ym = parts
            img = self.root / planet.lstrip("/") / f"{ym}-{self.day:02d}.tif"
            lab = self.root / label.lstrip("/")
            for p in (img, lab):
                if not p.is_file():
                    raise FileNotFoundError(f"dynamicearthnet {split}: {p} is missing")
            self.items.append({"name": f"{lab.stem}", "image": img, "label": lab, "ym": ym})

    def __getitem__(self, i: int) -> dict:
        import datetime as dt

        it = self.items[i]
        with _open(it["image"]) as ds:
            if ds.count != 4:
                raise DatasetError(
                    f"{it['image']}: {ds.count} bands, expected 4 (B G R NIR PlanetFusion)"
                )
            bgr = ds.read([1, 2, 3]).astype(np.float32)
            prof = {
                "crs": ds.crs,
                "transform": ds.transform,
                "height": ds.height,
                "width": ds.width,
            }
        rgb = np.clip(bgr[::-1] / self.scale * 255.0, 0, 255)
        y, m = (int(v) for v in it["ym"].split("-"))
        doy = dt.date(y, m, self.day).timetuple().tm_yday
        s = modality_sample("hr", [rgb], "hr_rgb", [doy])
        s.pop("hr_pixel_valid")
        with _open(it["label"]) as ds:
            if ds.count != 7:
                raise DatasetError(f"{it['label']}: {ds.count} bands, expected 7 (one per class)")
            lab = ds.read()
        if lab.shape[1:] != rgb.shape[1:]:
            raise DatasetError(f"{it['label']}: {lab.shape[1:]} px, image {rgb.shape[1:]}")
        mask = np.full(lab.shape[1:], IGNORE_INDEX, np.int64)
        for k in range(len(self.classes)):
            mask[lab[k] == 255] = k
        s["mask"] = torch.from_numpy(mask)
        s["hr_doy"] = torch.tensor(doy, dtype=torch.int64)
        s["latlon"] = latlon_of(prof)
        s["name"] = it["name"]
        return s

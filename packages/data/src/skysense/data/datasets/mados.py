"""MADOS (Marine Debris and Oil Spill; Kikaki et al. 2024; PANGAEA's quick set): Sentinel-2
crops of 240 x 240 px at 10 m with sparse labels of 15 sea-surface classes.

Layout::

    Scene_<k>/10/Scene_<k>_L2R_rhorc_<wavelength>_<crop>.tif   10 m bands (492, 559, 665, 833)
    Scene_<k>/20/Scene_<k>_L2R_rhorc_<wavelength>_<crop>.tif   20 m bands (704, 739, 780, 864,
                                                               1610, 2186)
    Scene_<k>/60/Scene_<k>_L2R_rhorc_<wavelength>_<crop>.tif   60 m band (442)
    Scene_<k>/10/Scene_<k>_L2R_cl_<crop>.tif                   labels: 0 unlabelled (ignored),
                                                               1..15 the classes
    splits/{train,val,test}_X.txt                              crop names Scene_<k>_<crop>

Bands are named by their centre wavelength in nm (Rayleigh-corrected reflectance ``rhorc``,
0-1, NaN where masked): each is mapped to the Sentinel-2 band whose centre wavelength is nearest
(within 25 nm, so Sentinel-2A and 2B wavelengths both map), scaled to digital numbers
(x 10000; the ``s2_l2a`` statistics are a choice: rhorc is close to surface reflectance) and
resampled onto the 10 m grid (bilinear).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import _open, check_range, modality_sample, read_mask

MADOS_CLASSES = (
    "Marine Debris", "Dense Sargassum", "Sparse Floating Algae", "Natural Organic Material",
    "Ship", "Oil Spill", "Marine Water", "Sediment-Laden Water", "Foam", "Turbid Water",
    "Shallow Water", "Waves & Wakes", "Oil Platform", "Jellyfish", "Sea snot",
)  # fmt: skip
_BAND_RE = re.compile(r"_L2R_rhorc_(\d+)_(\d+)\.tif$")


def band_of_wavelength(nm: float) -> str | None:
    """The Sentinel-2 band whose centre wavelength is within 25 nm of ``nm``, or None."""
    from skysense.data.sensors import get_sensor

    spec = get_sensor("s2_l1c")
    d = [abs(w - nm) for w in spec.wavelengths_nm]
    k = int(np.argmin(d))
    return spec.bands[k] if d[k] <= 25 else None


class MADOS(RemoteSensingDataset):
    name = "mados"
    task = "segmentation"
    sensors = {"s2": "s2_l2a"}
    file_bands = {
        "s2": ("442", "492", "559", "665", "704", "739", "780", "833", "864", "1610", "2186")
    }
    resolution = {"s2": 10.0}
    crs = "the crops' own; 20 / 60 m bands resampled onto the 10 m grid"
    classes = MADOS_CLASSES
    label_encoding = "Scene_<k>_L2R_cl_<crop>.tif: 0 unlabelled (ignored), 1..15 = classes 0..14"
    split_files = {s: f"splits/{s}_X.txt" for s in ("train", "val", "test")}
    layout = (
        "root/Scene_<k>/{10,20,60}/Scene_<k>_L2R_rhorc_<nm>_<crop>.tif, root/splits/<split>_X.txt"
    )

    def __init__(self, root, split="train", split_file=None):
        super().__init__(root, split, split_file)
        items = []
        for lab in sorted(self.root.glob("Scene_*/10/*_L2R_cl_*.tif")):
            scene = lab.parent.parent
            crop = lab.name.rsplit("_L2R_cl_", 1)[1][: -len(".tif")]
            items.append(
                {"name": f"{scene.name}_{crop}", "scene": scene, "crop": crop, "label": lab}
            )
        if not items:
            raise FileNotFoundError(f"mados: no Scene_*/10/*_L2R_cl_*.tif under {self.root}")
        names = self.split_names()
        if names is None:
            raise DatasetError(f"mados: no split file {self.root / self.split_files[split]}")
        self.items = self.select(items, lambda it: it["name"], names)

    def _bands(self, it) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in it["scene"].glob(f"*/{it['scene'].name}_L2R_rhorc_*_{it['crop']}.tif"):
            m = _BAND_RE.search(p.name)
            if m is None:
                continue
            b = band_of_wavelength(float(m.group(1)))
            if b is None:
                raise DatasetError(f"{p}: {m.group(1)} nm is no Sentinel-2 band")
            if b in out:
                raise DatasetError(f"{p}: a second file for {b} (first: {out[b].name})")
            out[b] = p
        return out

    def __getitem__(self, i: int) -> dict:
        from rasterio.enums import Resampling

        from skysense.data.sensors import get_sensor

        spec = get_sensor(self.sensors["s2"])
        it = self.items[i]
        files = self._bands(it)
        missing = [b for b in spec.model_bands if b not in files]
        if missing:
            raise DatasetError(
                f"mados {it['name']}: bands found {' '.join(sorted(files))}, expected "
                f"{' '.join(spec.model_bands)} (missing {' '.join(missing)})"
            )
        raw = read_mask(it["label"])
        h, w = raw.shape
        arr = np.empty((len(spec.model_bands), h, w), np.float32)
        for j, b in enumerate(spec.model_bands):
            with _open(files[b]) as ds:
                arr[j] = ds.read(1, out_shape=(h, w), resampling=Resampling.bilinear)
        arr *= np.float32(10000.0)
        check_range(files[spec.model_bands[0]], arr, spec)
        s = modality_sample("s2", [arr], spec.name, [0])
        mask = np.where((raw >= 1) & (raw <= len(self.classes)), raw - 1, IGNORE_INDEX)
        s["mask"] = torch.from_numpy(mask.astype(np.int64))
        s["name"] = it["name"]
        return s

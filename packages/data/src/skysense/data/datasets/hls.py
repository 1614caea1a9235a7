"""HLS Burn Scars (Phillips et al. 2023; PANGAEA's quick set): 804 chips of 512 x 512 px of
Harmonized Landsat Sentinel-2 (HLS S30) over the USA, burn-scar masks.

Layout::

    training/subsetted_512x512_HLS.S30.<tile>.<YYYYDDD>.v1.4_merged.tif   6 bands, reflectance
    training/subsetted_512x512_HLS.S30.<tile>.<YYYYDDD>.v1.4.mask.tif     1 burn scar, 0 not,
                                                                           -1 no data (ignored)
    validation/...

The 6 bands, in file order (the dataset card, huggingface.co/datasets/ibm-nasa-geospatial/
hls_burn_scars, "Band Order"; PANGAEA's hlsburnscars config lists the same B2 B3 B4 B8A B11
B12), as reflectance 0-1:

    file band   1     2      3    4             5       6
    HLS S30     B02   B03    B04  B8A           B11     B12
    name        Blue  Green  Red  NIR (narrow)  SWIR 1  SWIR 2

They are scaled to digital numbers (x 10000) and put in the model's band order by name (band
descriptions in a file win over this order). The model's S2 encoder takes ten bands, B2 B3 B4
B5 B6 B7 B8 B8A B11 B12: six come from the file (HLS's NIR is the narrow NIR of Sentinel-2,
B8A, 865 nm), and the four the chips lack, the red-edge B5 B6 B7 and the broad NIR B8, are
filled with the S2 statistics' mean, i.e. 0 after normalisation (``missing_bands``): a choice
this reader makes visibly, not a band read from the file, and the encoder sees no signal
there. The day of year comes from the file name (``YYYYDDD``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import (
    _open,
    check_range,
    file_band_names,
    latlon_of,
    modality_sample,
    read_mask,
)

HLS_BANDS = ("B2", "B3", "B4", "B8A", "B11", "B12")


class HLSBurnScars(RemoteSensingDataset):
    name = "hls_burn_scars"
    task = "segmentation"
    sensors = {"s2": "s2_l2a"}
    file_bands = {"s2": HLS_BANDS}
    resolution = {"s2": 30.0}
    crs = "UTM per chip (HLS tiles); lat/lon of the centre kept"
    classes = ("not burned", "burn scar")
    label_encoding = "<chip>.mask.tif: 1 burn scar, 0 not burned, -1 no data (ignored)"
    layout = "root/{training,validation}/subsetted_512x512_HLS.S30.<tile>.<YYYYDDD>.v1.4_merged.tif + .mask.tif"
    missing_bands = ("B5", "B6", "B7", "B8")
    _FOLDERS = {"train": "training", "val": "validation", "test": "validation"}

    def __init__(self, root, split="train", split_file=None):
        super().__init__(root, split, split_file)
        top = self.root / self._FOLDERS[split]
        if not top.is_dir():
            raise FileNotFoundError(f"hls_burn_scars: no {top} (expected layout: {self.layout})")
        items = []
        for img in sorted(top.glob("*_merged.tif")):
            mask = img.with_name(img.name.replace("_merged.tif", ".mask.tif"))
            if not mask.is_file():
                raise FileNotFoundError(f"hls_burn_scars: {img.name} has no mask {mask.name}")
            items.append({"name": img.name.replace("_merged.tif", ""), "image": img, "mask": mask})
        self.items = self.select(items, lambda it: it["name"], self.split_names())
        if not self.items:
            raise DatasetError(f"hls_burn_scars {split}: no *_merged.tif under {top}")

    def __getitem__(self, i: int) -> dict:
        from skysense.data.sensors import get_sensor

        spec = get_sensor(self.sensors["s2"])
        it = self.items[i]
        with _open(it["image"]) as ds:
            names = file_band_names(ds, HLS_BANDS)
            raw = ds.read().astype(np.float32)
            prof = {
                "crs": ds.crs,
                "transform": ds.transform,
                "height": ds.height,
                "width": ds.width,
            }
            nodata = ds.nodata
        if nodata is not None:
            raw[:, (raw == np.float32(nodata)).all(0)] = np.nan
        if np.nanmax(raw) <= 2.0:  # reflectance 0-1, as distributed
            raw *= np.float32(10000.0)
        arr = np.empty((len(spec.model_bands), *raw.shape[1:]), np.float32)
        for j, b in enumerate(spec.model_bands):
            arr[j] = raw[names.index(b)] if b in names else spec.mean[j]
        check_range(it["image"], raw, spec)
        m = re.search(r"\.(\d{4})(\d{3})\.", it["image"].name)
        doy = int(m.group(2)) if m else 0
        s = modality_sample("s2", [arr], spec.name, [doy])
        lab = read_mask(it["mask"])
        mask = np.full(lab.shape, IGNORE_INDEX, np.int64)
        mask[lab == 0], mask[lab == 1] = 0, 1
        s["mask"] = torch.from_numpy(mask)
        s["latlon"] = latlon_of(prof)
        s["name"] = it["name"]
        return s

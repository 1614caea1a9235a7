"""fMoW-Sentinel (fMoW-S2; Cong et al., SatMAE 2022): Sentinel-2 images of the Functional Map of
the World locations, 62 classes, one image per row of the split's CSV.

Layout::

    train.csv, val.csv, test_gt.csv     category, location_id, image_id, timestamp, polygon
    <split>/<category>/<category>_<location_id>/<category>_<location_id>_<image_id>.tif

Each image holds the 13 Sentinel-2 L1C bands in order of wavelength (B1 ... B8, B8A, B9, B10,
B11, B12; no band descriptions), uint16, variable size (resized to ``size``). An item: ``s2``
(1, 10, size, size) with the timestamp's day of year, ``label``.
"""

from __future__ import annotations

import csv
import datetime as dt

import torch
import torch.nn.functional as F

from skysense.data.datasets.base import DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import S2_L1C_ORDER, latlon_of, modality_sample, read_image

FMOW_CLASSES = tuple(
    [
        "airport",
        "airport_hangar",
        "airport_terminal",
        "amusement_park",
        "aquaculture",
        "archaeological_site",
        "barn",
        "border_checkpoint",
        "burial_site",
        "car_dealership",
        "construction_site",
        "crop_field",
        "dam",
        "debris_or_rubble",
        "educational_institution",
        "electric_substation",
        "factory_or_powerplant",
        "fire_station",
        "flooded_road",
        "fountain",
        "gas_station",
        "golf_course",
        "ground_transportation_station",
        "helipad",
        "hospital",
        "impoverished_settlement",
        "interchange",
        "lake_or_pond",
        "lighthouse",
        "military_facility",
        "multi-unit_residential",
        "nuclear_powerplant",
        "office_building",
        "oil_or_gas_facility",
        "park",
        "parking_lot_or_garage",
        "place_of_worship",
        "police_station",
        "port",
        "prison",
        "race_track",
        "railway_bridge",
        "recreational_facility",
        "road_bridge",
        "runway",
        "shipyard",
        "shopping_mall",
        "single-unit_residential",
        "smokestack",
        "solar_farm",
        "space_facility",
        "stadium",
        "storage_tank",
        "surface_mine",
        "swimming_pool",
        "toll_booth",
        "tower",
        "tunnel_opening",
        "waste_disposal",
        "water_treatment_facility",
        "wind_farm",
        "zoo",
    ]
)


class FMoWSentinel(RemoteSensingDataset):
    name = "fmow_s2"
    task = "classification"
    sensors = {"s2": "s2_l1c"}
    file_bands = {"s2": S2_L1C_ORDER}
    resolution = {"s2": 10.0}
    crs = "UTM per image; lat/lon of the centre kept"
    classes = FMOW_CLASSES
    label_encoding = "the CSV's category column (62 fMoW classes)"
    split_files = {"train": "train.csv", "val": "val.csv", "test": "test_gt.csv"}
    layout = "root/{train,val,test_gt}.csv, root/<split>/<category>/<category>_<loc>/<category>_<loc>_<img>.tif"

    def __init__(self, root, split="train", split_file=None, size: int = 64):
        super().__init__(root, split, split_file)
        path = self.split_file or self.root / self.split_files[split]
        if not path.is_file():
            raise FileNotFoundError(f"fmow_s2: no {path} (expected layout: {self.layout})")
        folder = {"train": "train", "val": "val", "test": "test"}[split]
        self.size = size
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"category", "location_id", "image_id", "timestamp"}
        if rows and not need <= set(rows[0]):
            raise DatasetError(f"{path}: columns {sorted(need - set(rows[0]))} missing")
        self.items = []
        for r in rows:
            c, loc, img = r["category"], r["location_id"], r["image_id"]
            if c not in FMOW_CLASSES:
                raise DatasetError(f"{path}: category {c!r} is not one of the 62 fMoW classes")
            p = self.root / folder / c / f"{c}_{loc}" / f"{c}_{loc}_{img}.tif"
            self.items.append(
                {"name": p.stem, "path": p, "label": FMOW_CLASSES.index(c), "time": r["timestamp"]}
            )

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        if not it["path"].is_file():
            raise FileNotFoundError(f"fmow_s2: {it['path']} (listed in the split) is missing")
        arr, sensor, prof = read_image(it["path"], "s2_l1c", S2_L1C_ORDER, return_profile=True)
        try:
            doy = dt.date.fromisoformat(it["time"][:10]).timetuple().tm_yday
        except ValueError:
            doy = 0
        s = modality_sample("s2", [arr], sensor, [doy])
        s.pop("s2_pixel_valid")  # images differ in size: no per-pixel mask after resizing
        if self.size and tuple(arr.shape[-2:]) != (self.size, self.size):
            s["s2"] = F.interpolate(
                s["s2"], size=(self.size, self.size), mode="bilinear", antialias=True
            )
        s["latlon"] = latlon_of(prof)
        s["label"] = torch.tensor(it["label"], dtype=torch.int64)
        return s

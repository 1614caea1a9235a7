"""High-resolution change pairs: LEVIR-CD (Chen & Shi 2020; 637 pairs of 1024 x 1024 px, 0.5 m,
Google Earth RGB, building changes) and WHU-CD (Ji et al. 2019; 0.3 m aerial RGB, building
changes; distributed as one large pair, commonly cut into 256 x 256 tiles).

Layouts (both read by each class)::

    root/{train,val,test}/A/<name>.png, B/<name>.png, label/<name>.png     (LEVIR-CD)
    root/A/<name>.png, B/<name>.png, label/<name>.png,
    root/list/{train,val,test}.txt   (file names, one a line)              (cut WHU-CD, LEVIR-CD-256)

``A`` is the earlier date, ``B`` the later; ``label`` is 0 (no change) / 255 (change), 8-bit
PNG (one band, or three equal bands). An item: ``{"t1": {"hr"}, "t2": {"hr"}, "mask"}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import _open, modality_sample, read_image


class LEVIRCD(RemoteSensingDataset):
    """Args (beyond the base's): ``label_values``: raw label value -> class (default 0 -> no
    change, 255 -> change; any other value is an error naming the file)."""

    name = "levir_cd"
    task = "change"
    sensors = {"hr": "hr_rgb"}
    file_bands = {"hr": ("R", "G", "B")}
    resolution = {"hr": 0.5}
    crs = "none (PNG): pairs are co-registered pixel for pixel"
    classes = ("no change", "change")
    label_encoding = "label/<name>.png: 0 = no change, 255 = change"
    split_files = {s: f"list/{s}.txt" for s in ("train", "val", "test")}
    layout = (
        "root/{train,val,test}/{A,B,label}/<name>.png, or root/{A,B,label}/ + root/list/<split>.txt"
    )

    def __init__(self, root, split="train", split_file=None, label_values=None):
        super().__init__(root, split, split_file)
        self.values = (
            {int(k): int(v) for k, v in dict(label_values).items()}
            if label_values
            else {0: 0, 255: 1}
        )
        names = self.split_names()
        top = self.root / split if (self.root / split / "A").is_dir() else self.root
        if not (top / "A").is_dir():
            raise FileNotFoundError(
                f"{self.name}: no folder {top / 'A'} (expected layout: {self.layout})"
            )
        files = {p.stem: p for p in sorted((top / "A").iterdir()) if not p.name.startswith(".")}
        if names is None:
            if top == self.root:
                raise DatasetError(
                    f"{self.name}: {self.root} has A/ B/ label/ but no {self.split_files[split]}"
                    " to say which pairs are in the split (set data.split_file)"
                )
            names = list(files)
        stems = [Path(n).stem for n in names]
        missing = [n for n in stems if n not in files]
        if missing:
            raise DatasetError(
                f"{self.name} {split}: {len(missing)} listed pairs not in {top / 'A'} "
                f"(first: {missing[0]})"
            )
        self.items = []
        for n in stems:
            a = files[n]
            b, lab = top / "B" / a.name, top / "label" / a.name
            for p in (b, lab):
                if not p.is_file():
                    raise FileNotFoundError(f"{self.name}: pair {n} has no {p}")
            self.items.append({"name": n, "A": a, "B": b, "label": lab})

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        out = {}
        shape = None
        for key, f in (("t1", it["A"]), ("t2", it["B"])):
            arr, sensor = read_image(f, "hr_rgb")
            if shape is not None and arr.shape != shape:
                raise DatasetError(f"{f}: {arr.shape[1:]} px but A is {shape[1:]}")
            shape = arr.shape
            out[key] = modality_sample("hr", [arr], sensor, [0])
            out[key].pop("hr_pixel_valid")
        with _open(it["label"]) as ds:
            raw = ds.read(1).astype(np.int64)
        if raw.shape != shape[1:]:
            raise DatasetError(f"{it['label']}: {raw.shape} px but the images are {shape[1:]}")
        unknown = sorted(set(np.unique(raw).tolist()) - set(self.values))
        if unknown:
            raise DatasetError(
                f"{it['label']}: values {unknown} not in label_values {sorted(self.values)}"
            )
        mask = np.full(raw.shape, IGNORE_INDEX, np.int64)
        for v, c in self.values.items():
            mask[raw == v] = c
        out["mask"] = torch.from_numpy(mask)
        out["name"] = it["name"]
        return out


class WHUCD(LEVIRCD):
    name = "whu_cd"
    resolution = {"hr": 0.3}
    layout = "root/{A,B,label}/<name>.png + root/list/{train,val,test}.txt (cut tiles)"

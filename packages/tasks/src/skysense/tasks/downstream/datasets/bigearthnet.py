"""BigEarthNet (Sumbul et al. 2019; the S1 extension of 2021): 1.2 km x 1.2 km patches with
Sentinel-2 L2A (12 bands, one GeoTIFF per band at 10 / 20 / 60 m) and Sentinel-1 (VV, VH in dB)
and CORINE multi-labels in ``<patch>_labels_metadata.json`` (the label format "multi-label
JSON").

Layout (as the BigEarthNet archives and ``../shared/data/bigearthnet``)::

    BigEarthNet-S2*/<S2 patch>/<S2 patch>_B01.tif ... _B12.tif, _labels_metadata.json
    BigEarthNet-S1*/<S1 patch>/<S1 patch>_VV.tif, _VH.tif, _labels_metadata.json
                     (the S1 JSON names its S2 partner in "corresponding_s2_patch")

Each sample is one patch: ``s2`` (1, 10, 120, 120) and/or ``s1`` (1, 2, 120, 120) single-step
series with their day of year, ``latlon`` from the patch centre, and ``label`` (K,) multi-hot
over the class vocabulary (the sorted names found, unless given).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from skysense.tasks.downstream.datasets.common import (
    day_of_year,
    normalise,
    random_crop_box,
    random_dihedral,
    series_sample,
)

log = logging.getLogger(__name__)

S2_SENSOR, S1_SENSOR = "s2_l2a", "s1_grd_db"


def read_multilabel_json(path: str | Path) -> list[str]:
    """The label names of a BigEarthNet ``*_labels_metadata.json`` (key "labels")."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"multi-label file {path}: unreadable JSON ({e})") from None
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"multi-label file {path}: 'labels' must be a list of class names")
    return labels


def find_patches(root: str | Path) -> list[dict]:
    """Patches under ``root``: ``{"name", "s2": folder or None, "s1": folder or None,
    "labels": [...]}``, S1 patches paired to their S2 patch through the S1 metadata."""
    root = Path(root)
    s2 = {}
    s1_of = {}
    for meta in sorted(root.rglob("*_labels_metadata.json")):
        folder = meta.parent
        d = json.loads(meta.read_text())
        if "corresponding_s2_patch" in d:
            s1_of[d["corresponding_s2_patch"]] = folder
        else:
            s2[folder.name] = folder
    if not s2 and not s1_of:
        raise FileNotFoundError(f"no BigEarthNet patch (*_labels_metadata.json) under {root}")
    names = sorted(set(s2) | set(s1_of))
    out = []
    for n in names:
        f2, f1 = s2.get(n), s1_of.get(n)
        meta = next(iter(sorted((f2 or f1).glob("*_labels_metadata.json"))))
        out.append({"name": n, "s2": f2, "s1": f1, "labels": read_multilabel_json(meta)})
    return out


def load_patch(patch: dict, modalities: Sequence[str], classes: Sequence[str]) -> dict:
    """One patch as a sample (see the module docstring)."""
    from skysense.data import io
    from skysense.data.geo import Grid
    from skysense.data.sensors import get_sensor

    sample: dict = {}
    profile = None
    for m in modalities:
        folder = patch[m]
        if folder is None:
            raise FileNotFoundError(f"BigEarthNet patch {patch['name']}: no {m.upper()} folder")
        spec = get_sensor(S2_SENSOR if m == "s2" else S1_SENSOR)
        arr, prof = io.read_band_folder(folder, sensor=spec, resolution=10)
        if profile is not None and (prof["height"], prof["width"]) != (
            profile["height"],
            profile["width"],
        ):
            raise ValueError(
                f"BigEarthNet patch {patch['name']}: S2 is {profile['height']} x {profile['width']} "
                f"px but S1 {prof['height']} x {prof['width']}"
            )
        profile = profile or prof
        x, valid = normalise(arr, spec.mean, spec.std)
        sample.update(series_sample(m, [x], [day_of_year(prof["date"])], [valid]))
    lat, lon = Grid(
        profile["crs"], profile["transform"], profile["height"], profile["width"]
    ).centre_latlon()
    sample["latlon"] = torch.tensor([lat, lon], dtype=torch.float32)
    label = torch.zeros(len(classes), dtype=torch.float32)
    unknown = [x for x in patch["labels"] if x not in classes]
    if unknown:
        raise ValueError(
            f"BigEarthNet patch {patch['name']}: labels {unknown} not in the class list"
        )
    for x in patch["labels"]:
        label[list(classes).index(x)] = 1.0
    sample["label"] = label
    return sample


class MultiLabelPatches(Dataset):
    """Loaded patches; item ``i`` of a training set is a random crop (and flip/turn) of patch
    ``i % n`` drawn from a generator seeded with (seed, i); without ``crop`` and ``augment`` the
    patches come as they are (evaluation).

    Args:
        samples: samples of :func:`load_patch`.
        length: items (default: one per sample).
        crop: side of a random crop in 10 m pixels (None: the whole patch).
    """

    def __init__(
        self,
        samples: Sequence[dict],
        length: int | None = None,
        crop: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ):
        self.samples = list(samples)
        self.length = length or len(self.samples)
        self.crop, self.augment, self.seed = crop, augment, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i % len(self.samples)]
        if not (self.crop or self.augment):
            return s
        rng = np.random.default_rng((self.seed, int(i)))
        if self.crop:
            m = next(k for k in ("s2", "s1") if k in s)
            top, left = random_crop_box(rng, *s[m].shape[-2:], self.crop)
            c = self.crop
            s = {
                k: (
                    v[..., top : top + c, left : left + c]
                    if k in ("s2", "s1", "s2_pixel_valid", "s1_pixel_valid")
                    else v
                )
                for k, v in s.items()
            }
        return random_dihedral(s, rng) if self.augment else s

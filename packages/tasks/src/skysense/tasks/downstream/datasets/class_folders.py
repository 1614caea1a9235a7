"""Scene classification from class folders (the label format "class folders"): ``root/<class
name>/<image>``, one image per sample, the class the folder's name (AID, RESISC-45, UC Merced
are distributed this way). Images may be GeoTIFFs or any format GDAL reads (PNG, JPEG); a
missing georeference is fine here (a classification label needs none).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from skysense.tasks.downstream.datasets.common import normalise, random_dihedral

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2")


def find_class_folders(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, class index) for every image, and the class names (sorted folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class-folder root {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"class-folder root {root} has no class sub-folder")
    items = []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"class folder {root / c} holds no image ({', '.join(IMAGE_SUFFIXES)})"
            )
        items += [(p, k) for p in files]
    return items, classes


def read_image(path: Path, sensor: str = "hr_rgb", size: int | None = None) -> torch.Tensor:
    """An image as (C, size, size) normalised float32 (bilinear resize when ``size``)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    from skysense.data.sensors import get_sensor

    spec = get_sensor(sensor)
    n = len(spec.model_bands)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as ds:
                if ds.count < n:
                    raise ValueError(
                        f"image {path}: {ds.count} bands, sensor {spec.name} needs {n}"
                    )
                arr = ds.read(list(range(1, n + 1))).astype(np.float32)
                nodata = ds.nodata
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"image {path}: unreadable ({e})") from None
    if nodata is not None:
        arr[:, (arr == nodata).all(0)] = np.nan
    x, _ = normalise(arr, spec.mean, spec.std)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x


class ClassFolderDataset(Dataset):
    """Samples ``{"hr": (3, size, size), "label": int64}`` of :func:`find_class_folders`'s items
    (read on access). ``augment``: random flips / quarter turns from a generator seeded with
    (seed, i); ``length`` > number of items cycles through them."""

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        size: int | None = 128,
        sensor: str = "hr_rgb",
        augment: bool = False,
        seed: int = 0,
        length: int | None = None,
    ):
        self.items, self.size, self.sensor = list(items), size, sensor
        self.augment, self.seed = augment, seed
        self.length = length or len(self.items)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        path, k = self.items[i % len(self.items)]
        s = {
            "hr": read_image(path, self.sensor, self.size),
            "label": torch.tensor(k, dtype=torch.int64),
        }
        if self.augment:
            s = random_dihedral(s, np.random.default_rng((self.seed, int(i))))
        return s


def split_items(items, val_fraction: float, seed: int = 0):
    """A per-class split: the last ``val_fraction`` of each class's items (after a seeded
    shuffle) for validation."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    train, val = [], []
    for k in sorted(by_class):
        its = by_class[k]
        order = rng.permutation(len(its))
        n_val = max(1, int(round(val_fraction * len(its)))) if len(its) > 1 else 0
        val += [its[j] for j in order[:n_val]]
        train += [its[j] for j in order[n_val:]]
    return train, val

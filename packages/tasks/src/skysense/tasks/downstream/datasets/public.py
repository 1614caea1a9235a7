"""The public datasets of :mod:`skysense.data.datasets` as fine-tuning data: ``data=<name>
data.root=...`` builds the dataset class registered under ``<name>`` for the training split and
the evaluation split (``data.val_split``, default ``val``), from the config's fields that the
class's constructor takes (``split_file``, ``train_split_file``, ``val_split_file`` override the
dataset's own split files).

- classification / multi-label: training items cycle through the training split with random
  flips / quarter turns (and random crops with ``data.crop``); evaluation is the split as is.
- segmentation / change: training items are random crops (``data.crop`` pixels of the mask's
  grid) of the split's tiles, read on access; evaluation is whole tiles, read on access, as
  :class:`DenseScene`\\ s (sliding windows over each).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from skysense.kernels.modalities import MODALITIES, SERIES
from skysense.tasks.downstream.datasets.common import random_crop_box, random_dihedral
from skysense.tasks.downstream.datasets.dense import DenseScene, crop_scene

log = logging.getLogger(__name__)

_NOT_KWARGS = {"name", "root", "split", "split_file", "val_split", "crop", "augment"}


def dataset_kwargs(cls, cfg: Mapping, which: str | None = None) -> dict:
    """The fields of ``cfg`` that ``cls``'s constructor takes (besides root / split); with
    ``which`` (train / val), ``<which>_<field>`` overrides ``<field>`` (OSCD's
    ``train_cities`` / ``val_cities`` -> ``cities``)."""
    params = set()
    for c in cls.__mro__:
        if "__init__" in c.__dict__:
            sig = inspect.signature(c.__dict__["__init__"])
            params |= {p for p in sig.parameters if p not in ("self", "kw", "kwargs")}
    out = {}
    for k in params - _NOT_KWARGS:
        v = cfg.get(f"{which}_{k}") if which and f"{which}_{k}" not in params else None
        if v is None:
            v = cfg.get(k)
        if v is not None:
            out[k] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def build_split(cls, cfg: Mapping, split: str, which: str):
    """``cls`` on ``cfg.root`` for ``split``; ``which`` = train / val picks
    ``<which>_split_file`` (else ``split_file`` for the training split) and ``<which>_<field>``
    overrides."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    sf = plain.get(f"{which}_split_file") or (plain.get("split_file") if which == "train" else None)
    return cls(str(plain["root"]), split=split, split_file=sf, **dataset_kwargs(cls, plain, which))


class ItemCycle(Dataset):
    """``length`` training items cycling through ``ds``; item ``i`` draws its flip / turn (and
    crop) from a generator seeded with (seed, i)."""

    def __init__(self, ds, length: int, seed: int = 0, augment: bool = True, crop=None):
        self.ds, self.length, self.seed, self.augment, self.crop = ds, length, seed, augment, crop

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        s = self.ds[i % len(self.ds)]
        rng = np.random.default_rng((self.seed, int(i)))
        if self.crop:
            ref = s["hr"] if "hr" in s else next(s[m] for m in SERIES if m in s)
            h, w = ref.shape[-2:]
            top, left = random_crop_box(rng, h, w, int(self.crop))
            c = int(self.crop)
            s = {
                k: (
                    v[..., top : top + c, left : left + c]
                    if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[-2:] == (h, w)
                    else v
                )
                for k, v in s.items()
            }
        return random_dihedral(s, rng) if self.augment else s


def to_scene(item: dict, fallback: str) -> DenseScene:
    """A dense item of a dataset -> :class:`DenseScene` (``rgb`` previews for the plots)."""

    item = dict(item)
    name = str(item.pop("name", fallback))
    profile = item.pop("profile", {})
    mask = item.pop("mask")
    return DenseScene(name, item, mask, None, profile)


def _rgb(sample: dict, sensors: Mapping[str, str]) -> np.ndarray | None:
    from skysense.data.datasets.plotting import preview

    for m in MODALITIES:
        if m in sample and m in sensors:
            return (preview(sample, m, sensors[m]) * 255).astype(np.uint8)
    return None


class Scenes:
    """Whole tiles of a dense dataset as :class:`DenseScene`\\ s, read on access."""

    def __init__(self, ds, limit: int | None = None):
        self.ds = ds
        self.n = len(ds) if not limit else min(limit, len(ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> DenseScene:
        if i >= self.n:
            raise IndexError(i)
        sc = to_scene(self.ds[i], self.ds.item_name(i))
        s = sc.sample
        if "t1" in s:
            a, b = _rgb(s["t1"], self.ds.sensors), _rgb(s["t2"], self.ds.sensors)
            sc.rgb = np.stack([a, b]) if a is not None and b is not None else None
        else:
            sc.rgb = _rgb(s, self.ds.sensors)
        return sc


class TileCrops(Dataset):
    """Random training crops of a dense dataset's tiles: item ``i`` reads tile ``i % n`` and
    cuts a ``crop`` window (whole tile when None) with a generator seeded with (seed, i)."""

    def __init__(self, ds, crop: int | None, length: int, seed: int = 0, augment: bool = True):
        self.ds, self.crop, self.length, self.seed, self.augment = ds, crop, length, seed, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, int(i)))
        k = i % len(self.ds)
        if self.crop and hasattr(self.ds, "read_window"):
            # Large tiles (Potsdam's 6000 px): read only the crop.
            from rasterio.windows import Window

            h, w = self.ds.tile_shape(k)
            c = int(self.crop)
            top, left = random_crop_box(rng, h, w, c)
            sc = to_scene(self.ds.read_window(k, Window(left, top, c, c)), "")
            s = crop_scene(sc, 0, 0, c)
        else:
            sc = to_scene(self.ds[k], "")
            h, w = sc.mask.shape
            c = int(self.crop) if self.crop else min(h, w)
            top, left = random_crop_box(rng, h, w, c)
            s = crop_scene(sc, top, left, c)
        return random_dihedral(s, rng) if self.augment else s


def class_weights_of(ds, n_classes: int, limit: int = 32) -> list[float]:
    """Inverse square-root class frequencies (mean 1) over up to ``limit`` training tiles."""
    counts = np.zeros(n_classes)
    for i in range(min(limit, len(ds))):
        m = ds[i]["mask"].numpy()
        m = m[m < n_classes]
        counts += np.bincount(m, minlength=n_classes)[:n_classes]
    w = np.sqrt(counts.sum() / np.maximum(counts, 1))
    return (w / w.mean()).tolist()


class DetectionScenes:
    """Whole images of a detection dataset as :class:`DetectionScene`\\ s, read on access."""

    def __init__(self, ds, limit: int | None = None):
        self.ds = ds
        self.n = len(ds) if not limit else min(limit, len(ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from skysense.tasks.downstream.datasets.boxes import DetectionScene

        if i >= self.n:
            raise IndexError(i)
        s = self.ds[i]
        rgb = _rgb(s, self.ds.sensors)
        scene = DetectionScene(str(s.get("name", i)), s["hr"], s["boxes"], s["labels"], rgb, {})
        # Oriented datasets (DIOR-R, FAIR1M): the (M, 8) corners, for a rotated-box mAP
        # (skysense.data.datasets.oriented.rotated_map).
        scene.polygons = s.get("polygons")
        return scene


class BoxCrops(Dataset):
    """Random ``crop`` windows (with random flips) of a detection dataset's images: item ``i``
    reads image ``i % n``; boxes keeping ``min_visible`` of their area stay, clipped."""

    def __init__(self, ds, crop, length, seed=0, min_visible=0.5, augment=True):
        self.ds, self.crop, self.length, self.seed = ds, crop, length, seed
        self.min_visible, self.augment = min_visible, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        from skysense.tasks.downstream.datasets.boxes import crop_boxes_keep

        rng = np.random.default_rng((self.seed, int(i)))
        s = self.ds[i % len(self.ds)]
        img = s["hr"]
        h, w = img.shape[-2:]
        c = int(self.crop) if self.crop else min(h, w)
        top, left = random_crop_box(rng, h, w, c)
        img = img[:, top : top + c, left : left + c]
        boxes, keep = crop_boxes_keep(s["boxes"], top, left, c, self.min_visible)
        boxes, labels = boxes[keep], s["labels"][keep]
        # Oriented boxes (DIOR-R, FAIR1M): (M, 8) corners x1 y1 .. x4 y4, moved with the crop
        # and the flips (not clipped: their rotated IoU is computed on the whole polygon).
        poly = None
        if "polygons" in s:
            poly = s["polygons"].reshape(-1, 8).to(torch.float32)[keep].clone()
            poly[:, 0::2] -= left
            poly[:, 1::2] -= top
        if self.augment and rng.random() < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([c - boxes[:, 2], boxes[:, 1], c - boxes[:, 0], boxes[:, 3]], 1)
            if poly is not None:
                poly[:, 0::2] = c - poly[:, 0::2]
        if self.augment and rng.random() < 0.5:
            img = img.flip(-2)
            boxes = torch.stack([boxes[:, 0], c - boxes[:, 3], boxes[:, 2], c - boxes[:, 1]], 1)
            if poly is not None:
                poly[:, 1::2] = c - poly[:, 1::2]
        out = {"hr": img.contiguous(), "boxes": boxes.reshape(-1, 4), "labels": labels}
        if poly is not None:
            out["polygons"] = poly
        return out

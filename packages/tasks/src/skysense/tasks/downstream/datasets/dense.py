"""Scenes with a per-pixel label mask (segmentation, change detection) and their random crops.

A :class:`DenseScene` holds a whole labelled scene: a contract sample (or, for change
detection, ``{"t1": sample, "t2": sample}``) and the mask on the grid of the task's reference
modality. Other modalities may be finer (HR over S2: e.g. 8 HR pixels per S2 pixel) as long as
the scale is an integer: a crop of ``c`` mask pixels takes ``c * f`` pixels of a modality ``f``
times finer, so every input of a crop covers the same ground.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from skysense.tasks.downstream.datasets.common import (
    IGNORE_INDEX,
    SPATIAL_KEYS,
    random_dihedral,
)


@dataclass
class DenseScene:
    """``sample``: contract sample (or ``{"t1", "t2"}``) of the whole scene; ``mask`` (H, W)
    int64 (``IGNORE_INDEX`` = unknown); ``rgb`` (H, W, 3) or (2, H, W, 3) uint8 for plots;
    ``profile``: the reference grid (crs, transform, height, width)."""

    name: str
    sample: dict
    mask: Tensor
    rgb: np.ndarray | None = None
    profile: dict = field(default_factory=dict)


def _scale(v: Tensor, ref: int, key: str) -> int:
    side = v.shape[-1]
    if side % ref:
        raise ValueError(f"{key}: {side} px is not a whole multiple of the mask's {ref} px")
    return side // ref


def crop_sample(sample: dict, top: int, left: int, size: int, ref_width: int) -> dict:
    """The ``size`` x ``size`` window at (top, left) of the reference grid, for every spatial
    input (each at its own integer scale)."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, dict):
            out[k] = crop_sample(v, top, left, size, ref_width)
        elif k in SPATIAL_KEYS and isinstance(v, Tensor):
            f = _scale(v, ref_width, k)
            out[k] = v[..., top * f : (top + size) * f, left * f : (left + size) * f]
        else:
            out[k] = v
    return out


def crop_scene(scene: DenseScene, top: int, left: int, size: int) -> dict:
    """A training sample: the scene's inputs and ``mask`` in one window."""
    w = scene.mask.shape[-1]
    out = crop_sample(scene.sample, top, left, size, w)
    out["mask"] = scene.mask[top : top + size, left : left + size]
    return out


class DenseCrops(Dataset):
    """Random training crops of dense scenes, reproducible: item ``i`` is drawn from a generator
    seeded with (seed, i), so any order of access and any number of workers give the same
    samples.

    Args:
        scenes: the training scenes.
        crop: side in pixels of the mask's grid.
        length: number of items (steps x batch).
        seed: base seed.
        focus_class, focus: with probability ``focus`` a crop is centred (with jitter) on a
            random pixel of ``focus_class``: rare classes (OSCD's change: 1-3 % of the pixels)
            would otherwise seldom be seen.
        augment: random flips and quarter turns, the same for every input and the mask.
    """

    def __init__(
        self,
        scenes: Sequence[DenseScene],
        crop: int,
        length: int,
        seed: int = 0,
        focus_class: int | None = None,
        focus: float = 0.0,
        augment: bool = True,
    ):
        self.scenes = list(scenes)
        if not self.scenes:
            raise ValueError("DenseCrops: no training scene")
        for s in self.scenes:
            if min(s.mask.shape) < crop:
                raise ValueError(
                    f"scene {s.name} {tuple(s.mask.shape)} is smaller than the crop {crop}"
                )
        self.crop, self.length, self.seed = crop, length, seed
        self.focus, self.augment = focus, augment
        areas = np.array([s.mask.numel() for s in self.scenes], np.float64)
        self.p = areas / areas.sum()
        self.focus_px = [
            torch.nonzero(s.mask == focus_class).numpy()
            if focus_class is not None
            else np.zeros((0, 2))
            for s in self.scenes
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, int(i)))
        k = int(rng.choice(len(self.scenes), p=self.p))
        scene, c = self.scenes[k], self.crop
        h, w = scene.mask.shape
        px = self.focus_px[k]
        if len(px) and rng.random() < self.focus:
            y, x = px[rng.integers(len(px))]
            top = int(np.clip(y - c // 2 + rng.integers(-(c // 4), c // 4 + 1), 0, h - c))
            left = int(np.clip(x - c // 2 + rng.integers(-(c // 4), c // 4 + 1), 0, w - c))
        else:
            top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        sample = crop_scene(scene, top, left, c)
        return random_dihedral(sample, rng) if self.augment else sample


def class_weights(scenes: Sequence[DenseScene], n_classes: int) -> list[float]:
    """Class weights from the training masks: the inverse square root of each class's
    frequency, normalised to mean 1. (Full inverse frequency gives OSCD's change class, 1-3 %
    of the pixels, 30-100x the weight and unstable first steps; the square root gives 6-10x.)"""
    counts = np.zeros(n_classes)
    for s in scenes:
        m = s.mask[s.mask != IGNORE_INDEX]
        counts += np.bincount(m.numpy(), minlength=n_classes)[:n_classes]
    w = np.sqrt(counts.sum() / np.maximum(counts, 1))
    return (w / w.mean()).tolist()

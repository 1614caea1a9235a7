"""The eo-learn Slovenia example patch as time-series pixel classification (``data:
eolearn_slovenia`` in a suite; no fine-tuning reader: only the probes read it).

Layout under ``root`` (the eo-learn example data, MIT, as in ../shared/data/eolearn_slovenia):
``REFERENCE_SCENES.npy`` (5, 101, 100, 13) float32 Sentinel-2 L1C reflectance 0-1 of the 13
bands in L1C order (B1 ... B8, B8A, B9, B10, B11, B12), dates not recorded; and
``TestEOPatch/mask_timeless/LULC.npy`` (101, 100, 1) uint16 land-cover codes of the same
1 km x 1 km place (eo-learn's LULC: 0 no data, 1 cultivated land, 2 forest, 3 grassland,
4 shrubland, 5 water, 6 wetland, 7 tundra, 8 artificial surface, 9 bare land, 10 snow and ice).

Model input: the 5 steps as an S2 series (reflectance x 10000 = DN, the model's 10 bands picked
by name, normalised with the ``s2_l1c`` statistics). The day of year is unknown: the steps get
evenly spread days (1, 74, 147, 220, 293), stated here because the encoder's date encoding sees
them. Classes: the codes with at least ``min_pixels`` (50) labelled pixels (here: forest,
grassland, shrubland, artificial surface; the 11 pixels of cultivated land and code 0 are
ignored). Split: the patch is cut into ``block`` x ``block`` px blocks (10); block (i, j) is a
test block when (i + j) % 3 == 0 (a fixed diagonal pattern spread over the patch, so every
class has test pixels), the others are training blocks, of which whole blocks are held out for
validation (chosen by the seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX
from skysense.tasks.downstream.datasets.dense import DenseScene

LULC = {
    1: "cultivated land",
    2: "forest",
    3: "grassland",
    4: "shrubland",
    5: "water",
    6: "wetland",
    7: "tundra",
    8: "artificial surface",
    9: "bare land",
    10: "snow and ice",
}
L1C_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


def load_slovenia(root: str | Path, min_pixels: int = 50) -> tuple[DenseScene, list[str]]:
    """The patch as one :class:`DenseScene` (mask: class indices, IGNORE_INDEX for no data)
    and the class names."""
    from skysense.data.sensors import get_sensor

    root = Path(str(root)).expanduser()
    img_path = root / "REFERENCE_SCENES.npy"
    lab_path = root / "TestEOPatch" / "mask_timeless" / "LULC.npy"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise FileNotFoundError(f"data=eolearn_slovenia: {p} does not exist")
    img = np.load(img_path, allow_pickle=False)  # (T, H, W, 13)
    lulc = np.load(lab_path, allow_pickle=False)[..., 0].astype(np.int64)  # (H, W)
    if img.ndim != 4 or img.shape[-1] != 13 or img.shape[1:3] != lulc.shape:
        raise ValueError(f"{img_path} {img.shape} and {lab_path} {lulc.shape} do not match")
    spec = get_sensor("s2_l1c")
    idx = [L1C_ORDER.index(b) for b in spec.model_bands]
    x = torch.from_numpy(img[..., idx] * 10000.0).permute(0, 3, 1, 2).float()
    mean = torch.tensor(spec.mean)[None, :, None, None]
    std = torch.tensor(spec.std)[None, :, None, None]
    x = (x - mean) / std
    t = x.shape[0]
    vals, counts = np.unique(lulc, return_counts=True)
    codes = [int(c) for c, n in zip(vals, counts) if c != 0 and n >= min_pixels]
    mask = torch.full(lulc.shape, IGNORE_INDEX, dtype=torch.long)
    for i, c in enumerate(codes):
        mask[torch.from_numpy(lulc == c)] = i
    sample = {
        "s2": x,
        "s2_doy": torch.tensor([1 + 73 * i for i in range(t)], dtype=torch.long),
        "s2_valid": torch.ones(t, dtype=torch.bool),
    }
    return DenseScene("slovenia", sample, mask), [LULC.get(int(c), f"code {c}") for c in codes]


def slovenia_feature_set(entry, data_cfg, featuriser, device):
    from skysense.tasks.benchmark.sources import FeatureSet, pixel_rows

    scene, classes = load_slovenia(data_cfg.root, int(data_cfg.get("min_pixels", 50)))
    h, w = scene.mask.shape
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rr, cc = rr.flatten(), cc.flatten()
    lab = scene.mask.flatten() != IGNORE_INDEX
    block = int(data_cfg.get("block", 10))
    src = "s2" if entry.features == "pooled" else entry.features
    x = pixel_rows(featuriser, scene, rr, cc, src, int(entry.window), device, False)
    y = scene.mask.flatten()
    bi, bj = rr // block, cc // block
    is_test = (bi + bj) % 3 == 0
    tr, te = lab & ~is_test, lab & is_test
    groups = bi * (w // block + 1) + bj
    info = {
        "pixels": {"train": int(tr.sum()), "test": int(te.sum())},
        "test_class_counts": torch.bincount(y[te], minlength=len(classes)).tolist(),
        "train_class_counts": torch.bincount(y[tr], minlength=len(classes)).tolist(),
        "split": f"{block} x {block} px blocks, test where (i + j) % 3 == 0",
    }
    return FeatureSet("pixels", classes, x[tr], y[tr], groups[tr], x[te], y[te], info)


def slovenia_task_data(cfg, length: int, seed: int, source: str | None = None):
    """The patch as fine-tuning data (``data=eolearn_slovenia``: the fine-tuning protocols,
    e.g. ``frozen_upernet_ltae``), with the probes' block split: the training blocks are dealt
    into ``train_groups`` (4) scenes by block index (each the whole image, labelled only on its
    blocks), so a validation split holds whole block groups out; the one evaluation scene is
    the whole image labelled only on the test blocks. Inputs see every pixel, as a sliding
    window over a real scene would; labels never overlap."""
    from skysense.tasks.downstream.data import TaskData, _sensor_inputs
    from skysense.tasks.downstream.datasets.dense import DenseCrops, class_weights

    scene, classes = load_slovenia(cfg.root, int(cfg.get("min_pixels", 50)))
    h, w = scene.mask.shape
    block = int(cfg.get("block", 10))
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    bi, bj = rr // block, cc // block
    is_test = (bi + bj) % 3 == 0
    bid = bi * (w // block + 1) + bj
    k = int(cfg.get("train_groups", 4))

    def masked(name: str, keep: torch.Tensor) -> DenseScene:
        m = scene.mask.clone()
        m[~keep] = IGNORE_INDEX
        return DenseScene(name, scene.sample, m)

    train = [masked(f"slovenia_train{g}", ~is_test & (bid % k == g)) for g in range(k)]
    test = [masked("slovenia_test", is_test)]
    ds = DenseCrops(train, int(cfg.crop), length, seed, augment=bool(cfg.get("augment", True)))
    count = lambda scs: sum(int((s.mask != IGNORE_INDEX).sum()) for s in scs)  # noqa: E731
    return TaskData(
        ds if length else None,
        test,
        classes,
        ("segmentation",),
        _sensor_inputs({"s2": "s2_l1c"}, "s2"),
        class_weights(train, len(classes)),
        {
            "train": [s.name for s in train],
            "val": [s.name for s in test],
            "pixels": {"train": count(train), "test": count(test)},
            "split": f"{block} x {block} px blocks, test where (i + j) % 3 == 0; training blocks "
            f"in {k} groups by block index",
        },  # fmt: skip
    )

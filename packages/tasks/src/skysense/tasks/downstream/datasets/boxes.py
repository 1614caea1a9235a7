"""Object boxes (the label format "box CSV / JSON") and detection samples from HR GeoTIFFs.

Box files, in pixel coordinates of their image (x right, y down, xmin < xmax, ymin < ymax):

- CSV with the columns ``image_path, xmin, ymin, xmax, ymax, label`` (DeepForest's layout,
  e.g. ``../shared/data/hr_rgb/OSBS_029.csv``);
- JSON, either COCO (``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``,
  ``bbox`` = [x, y, width, height], ``category_id``, and ``categories`` with ``id``/``name``) or a
  list of records with the CSV's keys.

Detection samples are ``{"hr": (3, H, W) float32, "boxes": (M, 4) float32 xyxy, "labels": (M,)
int64}``. One labelled scene is split by a vertical line into a training part (random crops) and
a held-out part (evaluated whole), so a single image gives an honest score.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from skysense.tasks.downstream.datasets.common import normalise

CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")


@dataclass
class Boxes:
    """The boxes of one image: ``xyxy`` (M, 4) float32 pixels and ``names`` (M,) class names."""

    xyxy: np.ndarray
    names: list[str]


def _check_box(path, where, x0, y0, x1, y1) -> None:
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"box file {path}, {where}: non-numeric coordinate")
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"box file {path}, {where}: box ({x0}, {y0}, {x1}, {y1}) needs xmin < xmax and "
            "ymin < ymax"
        )


def _from_records(path, records) -> dict[str, Boxes]:
    out: dict[str, list] = {}
    for i, r in enumerate(records):
        missing = [c for c in CSV_COLUMNS if c not in r]
        if missing:
            raise ValueError(
                f"box file {path}, record {i}: missing {missing} (needs {list(CSV_COLUMNS)})"
            )
        try:
            x0, y0, x1, y1 = (float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(
                f"box file {path}, record {i}: non-numeric coordinate in {r}"
            ) from None
        _check_box(path, f"record {i}", x0, y0, x1, y1)
        out.setdefault(Path(str(r["image_path"])).name, []).append(
            ((x0, y0, x1, y1), str(r["label"]))
        )
    return {
        k: Boxes(np.array([b for b, _ in v], np.float32).reshape(-1, 4), [n for _, n in v])
        for k, v in out.items()
    }


def _from_coco(path, d) -> dict[str, Boxes]:
    names = {c["id"]: c["name"] for c in d.get("categories", [])}
    files = {im["id"]: Path(im["file_name"]).name for im in d["images"]}
    out: dict[str, list] = {f: [] for f in files.values()}
    for i, a in enumerate(d.get("annotations", [])):
        if a["image_id"] not in files:
            raise ValueError(f"box file {path}, annotation {i}: unknown image_id {a['image_id']}")
        if a["category_id"] not in names:
            raise ValueError(
                f"box file {path}, annotation {i}: unknown category_id {a['category_id']}"
            )
        x, y, w, h = (float(v) for v in a["bbox"])
        _check_box(path, f"annotation {i}", x, y, x + w, y + h)
        out[files[a["image_id"]]].append(((x, y, x + w, y + h), names[a["category_id"]]))
    return {
        k: Boxes(np.array([b for b, _ in v], np.float32).reshape(-1, 4), [n for _, n in v])
        for k, v in out.items()
    }


def read_boxes(path: str | Path) -> dict[str, Boxes]:
    """Boxes per image file name (base name) from a CSV or JSON box file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"box file {path}: missing columns {missing} (has {reader.fieldnames})"
                )
            return _from_records(path, list(reader))
    if path.suffix.lower() == ".json":
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"box file {path}: unreadable JSON ({e})") from None
        if isinstance(d, dict) and "images" in d and "annotations" in d:
            return _from_coco(path, d)
        if isinstance(d, list):
            return _from_records(path, d)
        raise ValueError(
            f"box file {path}: neither COCO (images, annotations) nor a list of records"
        )
    raise ValueError(f"box file {path}: expected .csv or .json")


@dataclass
class DetectionScene:
    """A normalised HR image ``hr`` (3, H, W) with its boxes ``boxes`` (M, 4) and ``labels``
    (M,), the ``rgb`` (H, W, 3) uint8 for plots and the image's profile."""

    name: str
    hr: Tensor
    boxes: Tensor
    labels: Tensor
    rgb: np.ndarray
    profile: dict

    def columns(self, x0: int, x1: int) -> DetectionScene:
        """The columns [x0, x1): boxes whose centre lies inside, clipped to it."""
        b = self.boxes
        cx = (b[:, 0] + b[:, 2]) / 2
        keep = (cx >= x0) & (cx < x1)
        nb = b[keep].clone()
        nb[:, [0, 2]] = nb[:, [0, 2]].clamp(x0, x1) - x0
        return DetectionScene(
            f"{self.name}[:, {x0}:{x1}]",
            self.hr[:, :, x0:x1],
            nb,
            self.labels[keep],
            self.rgb[:, x0:x1],
            self.profile,
        )


def load_detection_scene(
    image: str | Path,
    boxes: str | Path,
    classes: Sequence[str] | None = None,
    sensor: str = "hr_rgb",
) -> tuple[DetectionScene, list[str]]:
    """An HR GeoTIFF and its boxes (file name matched in the box file). Returns (scene, classes)."""
    from skysense.data import io
    from skysense.data.sensors import get_sensor

    image = Path(image)
    spec = get_sensor(sensor)
    arr, prof = io.read_stack(image, sensor=spec)
    table = read_boxes(boxes)
    if image.name not in table:
        raise KeyError(
            f"box file {boxes} has no boxes for image {image.name} (images: {sorted(table)[:10]})"
        )
    bx = table[image.name]
    names = (
        sorted({n for b in table.values() for n in b.names}) if classes is None else list(classes)
    )
    unknown = sorted(set(bx.names) - set(names))
    if unknown:
        raise ValueError(f"box file {boxes}: classes {unknown} not in {names}")
    h, w = arr.shape[1:]
    xyxy = np.clip(bx.xyxy, 0, [w, h, w, h]).astype(np.float32)
    x, _ = normalise(arr, spec.mean, spec.std)
    # For display, a band's nodata (255 in NEON tiles: saturated pixels) shows as saturated.
    rgb = np.nan_to_num(arr[:3].transpose(1, 2, 0), nan=255.0).clip(0, 255).astype(np.uint8)
    scene = DetectionScene(
        image.stem,
        x,
        torch.from_numpy(xyxy),
        torch.tensor([names.index(n) for n in bx.names], dtype=torch.int64),
        rgb,
        prof,
    )
    return scene, names


def crop_boxes(
    boxes: Tensor, labels: Tensor, top: int, left: int, size: int, min_visible: float
) -> tuple[Tensor, Tensor]:
    """Boxes inside the crop (shifted and clipped) that keep at least ``min_visible`` of their
    area."""
    c, keep = crop_boxes_keep(boxes, top, left, size, min_visible)
    return c[keep], labels[keep]


def crop_boxes_keep(
    boxes: Tensor, top: int, left: int, size: int, min_visible: float
) -> tuple[Tensor, Tensor]:
    """(M, 4) xyxy boxes -> the boxes shifted into a ``size`` crop at (top, left) and clipped
    (M, 4), and the (M,) bool mask of those that keep ``min_visible`` of their area (and 2 px)."""
    b = boxes.clone()
    b[:, [0, 2]] -= left
    b[:, [1, 3]] -= top
    c = b.clone()
    c[:, [0, 2]] = c[:, [0, 2]].clamp(0, size)
    c[:, [1, 3]] = c[:, [1, 3]].clamp(0, size)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    vis = (c[:, 2] - c[:, 0]).clamp_min(0) * (c[:, 3] - c[:, 1]).clamp_min(0)
    keep = (vis >= min_visible * area) & (c[:, 2] - c[:, 0] >= 2) & (c[:, 3] - c[:, 1] >= 2)
    return c, keep


class DetectionCrops(Dataset):
    """Random crops (with random horizontal / vertical flips) of detection scenes; item ``i``
    comes from a generator seeded with (seed, i)."""

    def __init__(
        self,
        scenes: Sequence[DetectionScene],
        crop: int,
        length: int,
        seed: int = 0,
        min_visible: float = 0.5,
        augment: bool = True,
    ):
        self.scenes, self.crop, self.length, self.seed = list(scenes), crop, length, seed
        self.min_visible, self.augment = min_visible, augment
        for s in self.scenes:
            if min(s.hr.shape[-2:]) < crop:
                raise ValueError(
                    f"detection scene {s.name} {tuple(s.hr.shape[-2:])} is smaller than crop {crop}"
                )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, int(i)))
        s = self.scenes[int(rng.integers(len(self.scenes)))]
        h, w = s.hr.shape[-2:]
        c = self.crop
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        img = s.hr[:, top : top + c, left : left + c]
        boxes, labels = crop_boxes(s.boxes, s.labels, top, left, c, self.min_visible)
        if self.augment and rng.random() < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([c - boxes[:, 2], boxes[:, 1], c - boxes[:, 0], boxes[:, 3]], 1)
        if self.augment and rng.random() < 0.5:
            img = img.flip(-2)
            boxes = torch.stack([boxes[:, 0], c - boxes[:, 3], boxes[:, 2], c - boxes[:, 1]], 1)
        return {"hr": img.contiguous(), "boxes": boxes.reshape(-1, 4), "labels": labels}

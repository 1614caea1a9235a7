"""Object detection: DIOR (horizontal boxes, VOC XML), DIOR-R and FAIR1M (oriented boxes).

- DIOR (Li et al. 2020): 23,463 optical images of 800 x 800 px, 20 classes::

      JPEGImages-trainval/<id>.jpg, JPEGImages-test/<id>.jpg
      Annotations/Horizontal Bounding Boxes/<id>.xml   (or Annotations/<id>.xml): VOC XML,
                                                       <object><name> <bndbox><xmin>...
      Annotations/Oriented Bounding Boxes/<id>.xml     (DIOR-R): <robndbox> with x_left_top,
                                                       y_left_top, x_right_top, ... y_left_bottom
      ImageSets/Main/{train,val,test}.txt              image ids

- FAIR1M 1.0 / 2.0 (Sun et al. 2022): 37 fine-grained classes, oriented boxes::

      <split>/[part<k>/]images/<n>.tif, <split>/[part<k>/]labelXml/<n>.xml
      (XML: <object><possibleresult><name>, <points><point>x,y</point> x 5 (closed ring))

An item: ``hr`` (3, H, W), ``boxes`` (M, 4) float32 x0 y0 x1 y1 (for DIOR-R / FAIR1M the
enclosing horizontal boxes), ``labels`` (M,) int64, and for the oriented datasets ``polygons``
(M, 8) float32 corners. Rotated-box mAP: :func:`skysense.data.datasets.oriented.rotated_map`.
The fine-tuning head is horizontal (Faster R-CNN): an oriented head is not built yet.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from skysense.data.datasets.base import DatasetError, RemoteSensingDataset
from skysense.data.datasets.oriented import envelope
from skysense.data.datasets.readers import modality_sample, read_image

DIOR_CLASSES = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
    "Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation",
    "vehicle", "windmill",
)  # fmt: skip
FAIR1M_CLASSES = (
    "Boeing737", "Boeing747", "Boeing777", "Boeing787", "C919", "A220", "A321", "A330", "A350",
    "ARJ21", "other-airplane", "Passenger Ship", "Motorboat", "Fishing Boat", "Tugboat",
    "Engineering Ship", "Liquid Cargo Ship", "Dry Cargo Ship", "Warship", "other-ship",
    "Small Car", "Bus", "Cargo Truck", "Dump Truck", "Van", "Trailer", "Tractor", "Excavator",
    "Truck Tractor", "other-vehicle", "Basketball Court", "Tennis Court", "Football Field",
    "Baseball Field", "Intersection", "Roundabout", "Bridge",
)  # fmt: skip
_CORNERS = (
    "x_left_top", "y_left_top", "x_right_top", "y_right_top",
    "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom",
)  # fmt: skip


def _class_index(name: str, classes, where) -> int:
    low = {c.lower(): k for k, c in enumerate(classes)}
    k = low.get(name.strip().lower())
    if k is None:
        raise DatasetError(f"{where}: class {name!r} is not one of the {len(classes)} classes")
    return k


def _xml(path: Path):
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: unreadable XML ({e})") from None


def read_voc_boxes(path: Path, classes) -> tuple[np.ndarray, np.ndarray]:
    """VOC XML -> (boxes (M, 4) float32 x0 y0 x1 y1, labels (M,) int64)."""
    boxes, labels = [], []
    for obj in _xml(path).iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{path}: an <object> without <bndbox>")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(_class_index(obj.findtext("name", ""), classes, path))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def read_dior_r_polygons(path: Path, classes) -> tuple[np.ndarray, np.ndarray]:
    """DIOR-R XML -> (polygons (M, 8), labels (M,))."""
    polys, labels = [], []
    for obj in _xml(path).iter("object"):
        rb = obj.find("robndbox")
        if rb is None or rb.find("x_left_top") is None:
            raise DatasetError(f"{path}: an <object> without <robndbox> corners")
        polys.append([float(rb.findtext(k)) for k in _CORNERS])
        labels.append(_class_index(obj.findtext("name", ""), classes, path))
    return np.asarray(polys, np.float32).reshape(-1, 8), np.asarray(labels, np.int64)


def read_fair1m_polygons(path: Path, classes) -> tuple[np.ndarray, np.ndarray]:
    """FAIR1M XML -> (polygons (M, 8), labels (M,))."""
    polys, labels = [], []
    for obj in _xml(path).iter("object"):
        pts = [p.text.split(",") for p in obj.iter("point")]
        if len(pts) < 4:
            raise DatasetError(f"{path}: an <object> with {len(pts)} points, expected 4 or 5")
        polys.append([float(v) for xy in pts[:4] for v in xy])
        labels.append(_class_index(obj.findtext("possibleresult/name", ""), classes, path))
    return np.asarray(polys, np.float32).reshape(-1, 8), np.asarray(labels, np.int64)


class _Detection(RemoteSensingDataset):
    task = "detection"
    sensors = {"hr": "hr_rgb"}
    file_bands = {"hr": ("R", "G", "B")}
    crs = "none (JPEG / TIFF image pixels)"
    oriented = False

    def _labels(self, it):  # pragma: no cover - subclasses
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        arr, sensor = read_image(it["image"], "hr_rgb")
        s = modality_sample("hr", [arr], sensor, [0])
        s.pop("hr_pixel_valid")
        geom, labels = self._labels(it)
        h, w = arr.shape[1:]
        if self.oriented:
            s["polygons"] = torch.from_numpy(geom)
            geom = envelope(geom)
        boxes = np.clip(geom, 0, [w, h, w, h]).astype(np.float32)
        s["boxes"] = torch.from_numpy(boxes)
        s["labels"] = torch.from_numpy(labels)
        s["name"] = it["name"]
        return s


class DIOR(_Detection):
    name = "dior"
    resolution = {"hr": None}
    classes = DIOR_CLASSES
    label_encoding = "VOC XML per image: <object><name>, <bndbox> xmin ymin xmax ymax (pixels)"
    split_files = {s: f"ImageSets/Main/{s}.txt" for s in ("train", "val", "test")}
    layout = "root/JPEGImages-{trainval,test}/<id>.jpg, root/Annotations/Horizontal Bounding Boxes/<id>.xml, root/ImageSets/Main/<split>.txt"
    ann_dirs = ("Annotations/Horizontal Bounding Boxes", "Annotations")

    def __init__(self, root, split="train", split_file=None):
        super().__init__(root, split, split_file)
        ids = self.split_names()
        if ids is None:
            raise DatasetError(f"{self.name}: no {self.root / self.split_files[split]}")
        ann = next((self.root / d for d in self.ann_dirs if (self.root / d).is_dir()), None)
        if ann is None:
            raise FileNotFoundError(f"{self.name}: no {self.root / self.ann_dirs[0]}")
        img_dirs = [self.root / d for d in ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages")]
        self.items = []
        for n in ids:
            img = next((d / f"{n}.jpg" for d in img_dirs if (d / f"{n}.jpg").is_file()), None)
            xml = ann / f"{n}.xml"
            if img is None or not xml.is_file():
                raise FileNotFoundError(f"{self.name} {split}: image or {xml.name} of {n} missing")
            self.items.append({"name": n, "image": img, "xml": xml})

    def _labels(self, it):
        return read_voc_boxes(it["xml"], self.classes)


class DIORR(DIOR):
    name = "dior_r"
    oriented = True
    label_encoding = "XML per image: <object><name>, <robndbox> x/y_{left,right}_{top,bottom}"
    layout = "root/JPEGImages-{trainval,test}/<id>.jpg, root/Annotations/Oriented Bounding Boxes/<id>.xml, root/ImageSets/Main/<split>.txt"
    ann_dirs = ("Annotations/Oriented Bounding Boxes",)

    def _labels(self, it):
        return read_dior_r_polygons(it["xml"], self.classes)


class FAIR1M(_Detection):
    name = "fair1m"
    oriented = True
    resolution = {"hr": None}
    classes = FAIR1M_CLASSES
    label_encoding = "XML per image: <object><possibleresult><name>, <points> 4 corners (+ closing)"
    layout = "root/<train|validation|test>/[part<k>/]images/<n>.tif, .../labelXml/<n>.xml"
    _FOLDERS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}

    def __init__(self, root, split="train", split_file=None):
        super().__init__(root, split, split_file)
        top = next((self.root / d for d in self._FOLDERS[split] if (self.root / d).is_dir()), None)
        if top is None:
            raise FileNotFoundError(f"fair1m: no {self._FOLDERS[split][0]}/ under {self.root}")
        items = []
        for xml in sorted(top.rglob("labelXml/*.xml")):
            img = xml.parent.parent / "images" / f"{xml.stem}.tif"
            if img.is_file():
                items.append({"name": xml.stem, "image": img, "xml": xml})
        self.items = self.select(items, lambda it: it["name"], self.split_names())
        if not self.items:
            raise DatasetError(f"fair1m {split}: no image with a labelXml file under {top}")

    def _labels(self, it):
        return read_fair1m_polygons(it["xml"], self.classes)

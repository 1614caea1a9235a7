"""Fakes of the detection datasets.

- DIOR / DIOR-R: ``JPEGImages-trainval/<id>.jpg`` (00001-00003), ``JPEGImages-test/00004.jpg``,
  ``Annotations/Horizontal Bounding Boxes/<id>.xml`` (VOC), ``Annotations/Oriented Bounding
  Boxes/<id>.xml`` (robndbox corners), ``ImageSets/Main/{train,val,test}.txt``; 96 px images
  instead of 800.
- FAIR1M: ``train/part1/images/<n>.tif`` + ``train/part1/labelXml/<n>.xml`` (points as
  "x,y", the ring closed by a fifth point), ``validation/images`` + ``validation/labelXml``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fakes.common import smooth_rgb, write_image, write_tif

# Per image: (class name, x0, y0, x1, y1) of bright rectangles painted into the image.
DIOR_OBJECTS = {
    "00001": [("airplane", 10, 12, 40, 38), ("Expressway-Service-area", 50, 50, 90, 80)],
    "00002": [("vehicle", 20, 20, 34, 30), ("airplane", 60, 8, 88, 36)],
    "00003": [("storagetank", 30, 40, 60, 70)],
    "00004": [("airplane", 5, 60, 35, 90)],
}


def _paint(rng, size, objs):
    img = smooth_rgb(rng, size, 70)
    for _, x0, y0, x1, y1 in objs:
        img[y0:y1, x0:x1] = (230, 225, 220)
    return img


def make_dior(root: Path, size: int = 96) -> Path:
    rng = np.random.default_rng(7)
    hbb = root / "Annotations" / "Horizontal Bounding Boxes"
    obb = root / "Annotations" / "Oriented Bounding Boxes"
    hbb.mkdir(parents=True)
    obb.mkdir(parents=True)
    for n, objs in DIOR_OBJECTS.items():
        folder = "JPEGImages-test" if n == "00004" else "JPEGImages-trainval"
        write_image(root / folder / f"{n}.jpg", _paint(rng, size, objs))
        h = [f"<object><name>{c}</name><pose>Unspecified</pose><bndbox><xmin>{x0}</xmin>"
             f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
             for c, x0, y0, x1, y1 in objs]  # fmt: skip
        o = [f"<object><type>robndbox</type><name>{c}</name><robndbox><x_left_top>{x0}</x_left_top>"
             f"<y_left_top>{y0}</y_left_top><x_right_top>{x1}</x_right_top><y_right_top>{y0}"
             f"</y_right_top><x_right_bottom>{x1}</x_right_bottom><y_right_bottom>{y1}"
             f"</y_right_bottom><x_left_bottom>{x0}</x_left_bottom><y_left_bottom>{y1}"
             f"</y_left_bottom></robndbox></object>" for c, x0, y0, x1, y1 in objs]  # fmt: skip
        head = (f"<annotation><filename>{n}.jpg</filename><size><width>{size}</width>"
                f"<height>{size}</height><depth>3</depth></size>")  # fmt: skip
        (hbb / f"{n}.xml").write_text(head + "".join(h) + "</annotation>")
        (obb / f"{n}.xml").write_text(head + "".join(o) + "</annotation>")
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    for s, ids in (("train", ["00001", "00002"]), ("val", ["00003"]), ("test", ["00004"])):
        (sets / f"{s}.txt").write_text("\n".join(ids) + "\n")
    return root


def _fair_xml(objs) -> str:
    out = ["<annotation><source><filename>x.tif</filename></source><objects>"]
    for c, x0, y0, x1, y1 in objs:
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        out.append(
            "<object><coordinate>pixel</coordinate><type>rectangle</type><possibleresult>"
            f"<name>{c}</name><probability>1</probability></possibleresult><points>"
            + "".join(f"<point>{x:.6f},{y:.6f}</point>" for x, y in pts)
            + "</points></object>"
        )
    return "".join(out) + "</objects></annotation>"


def make_fair1m(root: Path, size: int = 96) -> Path:
    rng = np.random.default_rng(8)
    objs = {
        ("train/part1", "0"): [("Boeing737", 10, 10, 40, 30), ("Small Car", 60, 60, 70, 66)],
        ("train/part1", "1"): [("Motorboat", 30, 50, 50, 58)],
        ("validation", "2"): [("Boeing737", 20, 20, 50, 40)],
    }
    for (folder, n), o in objs.items():
        write_tif(root / folder / "images" / f"{n}.tif", _paint(rng, size, o).transpose(2, 0, 1))
        xml = root / folder / "labelXml" / f"{n}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(_fair_xml(o))
    return root

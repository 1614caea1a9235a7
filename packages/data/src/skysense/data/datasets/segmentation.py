"""Semantic segmentation tiles: ISPRS Potsdam and iSAID (HR RGB with colour-coded labels) and
Sen1Floods11 (Sentinel-1 + Sentinel-2 chips with water labels).

- Potsdam (ISPRS 2D labelling; 38 tiles of 6000 x 6000 px at 5 cm)::

      2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif           RGB uint8
      5_Labels_all/top_potsdam_<a>_<b>_label.tif        colour-coded RGB labels
      5_Labels_all_noBoundary/top_potsdam_<a>_<b>_label_noBoundary.tif   (eroded=True)

  Colours (each channel thresholded at 128): impervious surfaces white, building blue, low
  vegetation cyan, tree green, car yellow, clutter red; black (eroded boundaries) is ignored.
  Splits: the benchmark's 24 training tiles and 14 test tiles (val = test).
- iSAID (Zamir et al. 2019; DOTA images)::

      <split>/images/P0000.png  (or <split>/images/images/P0000.png)
      <split>/Semantic_masks/images/P0000_instance_color_RGB.png

  15 classes + background, one colour each (``ISAID_PALETTE``, as the iSAID devkit colours
  read as RGB). A mask with more than 1 % of pixels in colours outside the palette is an error
  (a palette in the wrong channel order shows up so, instead of as background).
- Sen1Floods11 (Bonafilia et al. 2020), hand-labelled chips of 512 x 512 px, EPSG:4326::

      v1.1/data/flood_events/HandLabeled/S2Hand/<id>_S2Hand.tif     13 bands L1C, B1..B8, B8A,
                                                                     B9..B12
      v1.1/data/flood_events/HandLabeled/S1Hand/<id>_S1Hand.tif     VV, VH dB (NaN no data)
      v1.1/data/flood_events/HandLabeled/LabelHand/<id>_LabelHand.tif   -1 no data, 0, 1 water
      v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv   S1Hand file, LabelHand file
"""

from __future__ import annotations

import numpy as np
import torch

from skysense.data.datasets.base import IGNORE_INDEX, DatasetError, RemoteSensingDataset
from skysense.data.datasets.readers import (
    S2_L1C_ORDER,
    _open,
    latlon_of,
    modality_sample,
    read_image,
    read_mask,
)


def colour_labels(
    path, palette, ignore=((0, 0, 0),), threshold: int | None = None, window=None
) -> np.ndarray:
    """An RGB colour-coded label image -> (H, W) int64 class index (``IGNORE_INDEX`` for the
    ``ignore`` colours). ``threshold``: binarise each channel at it first (Potsdam's labels).
    More than 1 % of pixels in other colours is an error naming the file and the colours."""
    with _open(path) as ds:
        if ds.count < 3:
            raise DatasetError(f"label {path}: {ds.count} bands, expected an RGB colour label")
        rgb = ds.read([1, 2, 3], window=window).astype(np.int64)
    if threshold is not None:
        rgb = np.where(rgb >= threshold, 255, 0)
    code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    out = np.full(code.shape, -1, np.int64)
    for k, (r, g, b) in enumerate(palette):
        out[code == ((r << 16) | (g << 8) | b)] = k
    for r, g, b in ignore:
        out[code == ((r << 16) | (g << 8) | b)] = IGNORE_INDEX
    bad = out == -1
    if bad.mean() > 0.01:
        vals, counts = np.unique(code[bad], return_counts=True)
        top = [f"({v >> 16},{(v >> 8) & 255},{v & 255})" for v in vals[np.argsort(-counts)][:3]]
        raise DatasetError(
            f"label {path}: {100 * bad.mean():.1f}% of pixels in colours outside the palette "
            f"(most: {' '.join(top)})"
        )
    out[bad] = IGNORE_INDEX
    return out


_POTSDAM_TRAIN = [
    "2_10",
    "2_11",
    "2_12",
    "3_10",
    "3_11",
    "3_12",
    "4_10",
    "4_11",
    "4_12",
    "5_10",
    "5_11",
    "5_12",
    "6_7",
    "6_8",
    "6_9",
    "6_10",
    "6_11",
    "6_12",
    "7_7",
    "7_8",
    "7_9",
    "7_10",
    "7_11",
    "7_12",
]
_POTSDAM_TEST = [
    "2_13",
    "2_14",
    "3_13",
    "3_14",
    "4_13",
    "4_14",
    "4_15",
    "5_13",
    "5_14",
    "5_15",
    "6_13",
    "6_14",
    "6_15",
    "7_13",
]


class _HRTiles(RemoteSensingDataset):
    """HR image + colour label tiles, with windowed reads (:meth:`tile_shape`,
    :meth:`read_window`) so a training crop of a 6000 px tile reads only the crop."""

    palette: tuple = ()
    ignore_colours: tuple = ((0, 0, 0),)
    threshold: int | None = None

    def tile_shape(self, i: int) -> tuple[int, int]:
        with _open(self.items[i]["image"]) as ds:
            return ds.height, ds.width

    def read_window(self, i: int, window=None) -> dict:
        """Item ``i`` (a :class:`rasterio.windows.Window` of it, or all of it)."""
        it = self.items[i]
        arr, sensor = read_image(it["image"], "hr_rgb", window=window)
        s = modality_sample("hr", [arr], sensor, [0])
        s.pop("hr_pixel_valid")
        mask = colour_labels(it["label"], self.palette, self.ignore_colours, self.threshold, window)
        if mask.shape != arr.shape[1:]:
            raise DatasetError(f"{it['label']}: {mask.shape} px, image {arr.shape[1:]}")
        s["mask"] = torch.from_numpy(mask)
        s["name"] = it["name"]
        return s

    def __getitem__(self, i: int) -> dict:
        return self.read_window(i)


class Potsdam(_HRTiles):
    """Args: ``eroded``: the labels without boundaries (5_Labels_all_noBoundary), as the
    benchmark scores; ``tiles``: explicit tile ids (``2_10``, ...) instead of the split."""

    name = "potsdam"
    task = "segmentation"
    sensors = {"hr": "hr_rgb"}
    file_bands = {"hr": ("R", "G", "B")}
    resolution = {"hr": 0.05}
    crs = "the tiles' own (ETRS89 / UTM 33N with their world files); labels pixel for pixel"
    classes = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter")
    palette = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
    label_encoding = "RGB colours: white, blue, cyan, green, yellow, red; black = ignored"
    threshold = 128
    layout = "root/2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif, root/5_Labels_all/top_potsdam_<a>_<b>_label.tif"

    def __init__(self, root, split="train", split_file=None, eroded: bool = False, tiles=None):
        super().__init__(root, split, split_file)
        names = self.split_names()
        ids = (
            list(tiles)
            if tiles
            else names or (_POTSDAM_TRAIN if split == "train" else _POTSDAM_TEST)
        )
        lab_dir, suffix = (
            ("5_Labels_all_noBoundary", "_label_noBoundary.tif")
            if eroded
            else ("5_Labels_all", "_label.tif")
        )
        self.items = []
        for t in ids:
            img = self.root / "2_Ortho_RGB" / f"top_potsdam_{t}_RGB.tif"
            lab = self.root / lab_dir / f"top_potsdam_{t}{suffix}"
            if img.is_file() and lab.is_file():
                self.items.append({"name": t, "image": img, "label": lab})
        if not self.items:
            raise DatasetError(f"potsdam {split}: none of the tiles {ids[:3]}... under {self.root}")


ISAID_CLASSES = (
    "background", "ship", "storage tank", "baseball diamond", "tennis court",
    "basketball court", "ground track field", "bridge", "large vehicle", "small vehicle",
    "helicopter", "swimming pool", "roundabout", "soccer ball field", "plane", "harbor",
)  # fmt: skip
# The colours of the distributed Semantic_masks/*_instance_color_RGB.png, in R G B order, checked
# against the iSAID devkit (CAPTAIN-WHU/iSAID_Devkit, preprocess/cityscapesScripts/
# cityscapesscripts/helpers/labels.py): its label colours (ship (0, 0, 63), ..., harbor
# (0, 100, 155)) are keyed by "m_color" = c0 + 256 c1 + 65536 c2 (ship 4128768 = 63 * 65536),
# the key its converter (evaluation/instances2dict_with_polygons.py) computes from the PNG as
# lycon.load reads it, in R G B order: so ship is blue 63, not red. Class order = the devkit's ids.
ISAID_PALETTE = (
    (0, 0, 0), (0, 0, 63), (0, 63, 63), (0, 63, 0), (0, 63, 127), (0, 63, 191), (0, 63, 255),
    (0, 127, 63), (0, 127, 127), (0, 0, 127), (0, 0, 191), (0, 0, 255), (0, 191, 127),
    (0, 127, 191), (0, 127, 255), (0, 100, 155),
)  # fmt: skip


class ISAID(_HRTiles):
    name = "isaid"
    task = "segmentation"
    sensors = {"hr": "hr_rgb"}
    file_bands = {"hr": ("R", "G", "B")}
    resolution = {"hr": None}
    crs = "none (PNG)"
    classes = ISAID_CLASSES
    palette = ISAID_PALETTE
    label_encoding = "RGB colour per class (ISAID_PALETTE; black = background)"
    ignore_colours = ()
    layout = "root/{train,val}/images/P<n>.png, root/{train,val}/Semantic_masks/images/P<n>_instance_color_RGB.png"

    def __init__(self, root, split="train", split_file=None):
        super().__init__(root, split, split_file)
        if split == "test":
            raise DatasetError("isaid: the test split has no public labels (use val)")
        top = self.root / split
        imgs = top / "images" / "images" if (top / "images" / "images").is_dir() else top / "images"
        masks = top / "Semantic_masks" / "images"
        if not imgs.is_dir() or not masks.is_dir():
            raise FileNotFoundError(f"isaid: no {imgs} or {masks} (expected layout: {self.layout})")
        items = []
        for p in sorted(imgs.glob("P*.png")):
            m = masks / f"{p.stem}_instance_color_RGB.png"
            if m.is_file():
                items.append({"name": p.stem, "image": p, "label": m})
        self.items = self.select(items, lambda it: it["name"], self.split_names())
        if not self.items:
            raise DatasetError(f"isaid {split}: no image with a semantic mask under {top}")


class Sen1Floods11(RemoteSensingDataset):
    name = "sen1floods11"
    task = "segmentation"
    sensors = {"s2": "s2_l1c", "s1": "s1_grd_db"}
    file_bands = {"s2": S2_L1C_ORDER, "s1": ("VV", "VH")}
    resolution = {"s2": 10.0, "s1": 10.0}
    crs = "EPSG:4326 chips; S1 and S2 on the same grid"
    classes = ("no water", "water")
    label_encoding = "LabelHand int16: -1 no data (ignored), 0 no water, 1 water"
    split_files = {
        "train": "splits/flood_handlabeled/flood_train_data.csv",
        "val": "splits/flood_handlabeled/flood_valid_data.csv",
        "test": "splits/flood_handlabeled/flood_test_data.csv",
    }
    layout = "root/[v1.1/]data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand}/, root/[v1.1/]splits/flood_handlabeled/*.csv"

    def __init__(self, root, split="train", split_file=None, modalities=("s2", "s1")):
        super().__init__(root, split, split_file, modalities)
        if (self.root / "v1.1").is_dir():
            self.root = self.root / "v1.1"
        names = self.split_names()
        if names is None:
            raise DatasetError(
                f"sen1floods11: no split file {self.root / self.split_files[split]} (set "
                "data.split_file)"
            )
        hand = self.root / "data" / "flood_events" / "HandLabeled"
        self.items = []
        for line in names:
            s1_file = line.split(",")[0].strip()
            cid = s1_file.replace("_S1Hand.tif", "")
            it = {
                "name": cid,
                "s1": hand / "S1Hand" / f"{cid}_S1Hand.tif",
                "s2": hand / "S2Hand" / f"{cid}_S2Hand.tif",
                "label": hand / "LabelHand" / f"{cid}_LabelHand.tif",
            }
            for k in ("label", *self.modalities):
                if not it[k].is_file():
                    raise FileNotFoundError(f"sen1floods11 {split}: {it[k]} is missing")
            self.items.append(it)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        s: dict = {}
        prof = None
        for m in self.modalities:
            arr, sensor, p = read_image(
                it[m], self.sensors[m], self.file_bands[m], return_profile=True
            )
            prof = prof or p
            s.update(modality_sample(m, [arr], sensor, [0]))
        raw = read_mask(it["label"])
        mask = np.full(raw.shape, IGNORE_INDEX, np.int64)
        mask[raw == 0], mask[raw == 1] = 0, 1
        s["latlon"] = latlon_of(prof)
        s["mask"] = torch.from_numpy(mask)
        s["name"] = it["name"]
        return s


__all__ = ["ISAID", "Potsdam", "Sen1Floods11", "colour_labels"]

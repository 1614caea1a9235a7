"""Label formats and downstream samples on files written here with a real GeoTIFF profile:
box CSV / JSON, multi-label JSON, GeoTIFF label masks (aligned, on another grid, without
georeferencing), class folders, crops that keep modalities aligned, collation."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from skysense.tasks.downstream.datasets import boxes as B
from skysense.tasks.downstream.datasets.common import IGNORE_INDEX, collate
from skysense.tasks.downstream.datasets.dense import DenseCrops, DenseScene, class_weights
from skysense.tasks.downstream.datasets.masks import read_label_mask
from skysense.tasks.training.checkpoint import safe_load

pytestmark = pytest.mark.unit

UTM = CRS.from_epsg(32633)
T10 = Affine(10, 0, 500000, 0, -10, 5000000)


def _write(path, arr, crs=UTM, transform=T10, nodata=None):
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    kw = {"crs": crs, "transform": transform} if crs is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        ds = rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=arr.shape[1],
            width=arr.shape[2],
            count=arr.shape[0],
            dtype=arr.dtype,
            nodata=nodata,
            **kw,
        )
    with ds:
        ds.write(arr)
    return path


# ----------------------------------------------------------------------------- boxes


def test_box_csv_and_json_formats(tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text(
        "image_path,xmin,ymin,xmax,ymax,label\na/img.tif,1,2,11,12,Tree\nimg.tif,5,5,9,20,Car\n"
        "other.tif,0,0,4,4,Tree\n"
    )
    t = B.read_boxes(csv)
    assert sorted(t) == ["img.tif", "other.tif"]
    np.testing.assert_array_equal(t["img.tif"].xyxy, [[1, 2, 11, 12], [5, 5, 9, 20]])
    assert t["img.tif"].names == ["Tree", "Car"]
    coco = {
        "images": [{"id": 7, "file_name": "dir/img.tif"}],
        "annotations": [{"image_id": 7, "bbox": [1, 2, 10, 10], "category_id": 3}],
        "categories": [{"id": 3, "name": "Tree"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    c = B.read_boxes(tmp_path / "c.json")
    np.testing.assert_array_equal(c["img.tif"].xyxy, [[1, 2, 11, 12]])
    recs = [
        {"image_path": "img.tif", "xmin": 1, "ymin": 2, "xmax": 11, "ymax": 12, "label": "Tree"}
    ]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    assert B.read_boxes(tmp_path / "r.json")["img.tif"].names == ["Tree"]


def test_bad_box_files_are_named(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("image_path,xmin,ymin,xmax,label\nimg.tif,1,2,3,Tree\n")
    with pytest.raises(ValueError, match=r"b.csv: missing columns \['ymax'\]"):
        B.read_boxes(p)
    p.write_text(
        "image_path,xmin,ymin,xmax,ymax,label\nimg.tif,1,2,11,12,Tree\nimg.tif,9,2,3,12,Tree\n"
    )
    with pytest.raises(ValueError, match="record 1: box .* xmin < xmax"):
        B.read_boxes(p)
    p.write_text("image_path,xmin,ymin,xmax,ymax,label\nimg.tif,a,2,11,12,Tree\n")
    with pytest.raises(ValueError, match="record 0: non-numeric"):
        B.read_boxes(p)
    (tmp_path / "x.json").write_text('{"images": [], "annotations": [{"image_id": 1}]}')
    with pytest.raises(ValueError, match="unknown image_id"):
        B.read_boxes(tmp_path / "x.json")


def test_crop_boxes_keeps_visible_boxes_shifted():
    boxes = torch.tensor([[10.0, 10, 20, 20], [28, 0, 40, 10], [50, 50, 60, 60]])
    labels = torch.tensor([0, 1, 0])
    b, lab = B.crop_boxes(boxes, labels, top=0, left=5, size=30, min_visible=0.5)
    # box 0 fully inside (shifted by 5); box 1 has 7 of 12 columns inside (58 %); box 2 outside.
    assert lab.tolist() == [0, 1]
    assert b.tolist() == [[5, 10, 15, 20], [23, 0, 30, 10]]
    b, lab = B.crop_boxes(boxes, labels, top=0, left=5, size=30, min_visible=0.6)
    assert lab.tolist() == [0]


def test_box_crops_move_polygons_with_boxes_and_flips():
    """BoxCrops (public detection datasets): oriented boxes follow the crop and both flips, so
    the enclosing box of each kept polygon is its horizontal box (none clipped here)."""
    from skysense.tasks.downstream.datasets.public import BoxCrops

    rng = np.random.default_rng(3)
    xy0 = rng.uniform(20, 70, (5, 2))
    wh = rng.uniform(4, 12, (5, 2))
    boxes = torch.tensor(np.concatenate([xy0, xy0 + wh], 1), dtype=torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    poly = torch.stack([x0, y0, x1, y0, x1, y1, x0, y1], 1)

    class One:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {
                "hr": torch.rand(3, 100, 100),
                "boxes": boxes,
                "labels": torch.arange(5),
                "polygons": poly.double(),
            }

    flipped = 0
    for i in range(12):
        out = BoxCrops(One(), crop=96, length=12, seed=1, min_visible=1.0)[i]
        p = out["polygons"]
        assert p.shape == (len(out["labels"]), 8) and p.dtype == torch.float32
        env = torch.stack(
            [p[:, 0::2].amin(1), p[:, 1::2].amin(1), p[:, 0::2].amax(1), p[:, 1::2].amax(1)], 1
        )
        torch.testing.assert_close(env, out["boxes"])
        flipped += int(not torch.equal(p[:, 0], env[:, 0]) or not torch.equal(p[:, 1], env[:, 1]))
    assert flipped > 0  # some draws flipped (a corner no longer the top-left one)
    batch = collate([out, out])
    assert isinstance(batch["polygons"], list) and len(batch["polygons"]) == 2


def test_detection_crops_flip_boxes_with_the_image():
    img = torch.zeros(3, 64, 64)
    img[:, 8:16, 40:56] = 1.0  # an object where its box is
    scene = B.DetectionScene(
        "s",
        img,
        torch.tensor([[40.0, 8, 56, 16]]),
        torch.tensor([0]),
        np.zeros((64, 64, 3), np.uint8),
        {},
    )
    ds = B.DetectionCrops([scene], crop=64, length=16, seed=1)
    for i in range(16):
        s = ds[i]
        x0, y0, x1, y1 = s["boxes"][0].long().tolist()
        # The box still frames the bright pixels after the flips.
        assert s["hr"][0, y0:y1, x0:x1].min() == 1.0
        assert s["hr"][0].sum() == s["hr"][0, y0:y1, x0:x1].sum()
    assert torch.equal(ds[3]["hr"], ds[3]["hr"])  # reproducible per index


# ------------------------------------------------------------------------ multi-label JSON


# -------------------------------------------------------------------------- label masks


def test_label_mask_on_the_image_grid(tmp_path):
    raw = np.array([[0, 1, 2], [2, 9, 1]], np.uint8)
    prof = {
        "crs": UTM,
        "transform": Affine(10, 0, 500000, 0, -10, 5000000),
        "height": 2,
        "width": 3,
    }
    _write(tmp_path / "m.tif", raw, nodata=0)
    m = read_label_mask(tmp_path / "m.tif", prof, {1: 0, 2: 1})
    assert m.tolist() == [[IGNORE_INDEX, 0, 1], [1, IGNORE_INDEX, 0]]  # 0 = nodata, 9 unmapped
    assert read_label_mask(tmp_path / "m.tif", prof).tolist() == [[IGNORE_INDEX, 1, 2], [2, 9, 1]]


def test_label_mask_on_another_grid_is_resampled_nearest(tmp_path):
    # The mask at 5 m over the image's 10 m grid, shifted by one image pixel to the east.
    raw = np.repeat(np.repeat(np.array([[1, 2], [3, 4]], np.uint8), 2, 0), 2, 1)
    _write(tmp_path / "m.tif", raw, transform=Affine(5, 0, 500010, 0, -5, 5000000))
    prof = {
        "crs": UTM,
        "transform": Affine(10, 0, 500000, 0, -10, 5000000),
        "height": 2,
        "width": 3,
    }
    m = read_label_mask(tmp_path / "m.tif", prof)
    assert m.tolist() == [[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, 3, 4]]
    far = {**prof, "transform": Affine(10, 0, 600000, 0, -10, 5000000)}
    with pytest.raises(ValueError, match="does not overlap"):
        read_label_mask(tmp_path / "m.tif", far)


def test_label_mask_without_georeference_must_match_the_shape(tmp_path):
    _write(tmp_path / "cm.tif", np.ones((4, 5), np.uint8), crs=None)
    prof = {"crs": UTM, "transform": Affine(10, 0, 0, 0, -10, 0), "height": 4, "width": 5}
    assert read_label_mask(tmp_path / "cm.tif", prof, {1: 0}).sum() == 0
    with pytest.raises(ValueError, match=r"cm.tif has no georeferencing and 4 x 5 .* 4 x 6"):
        read_label_mask(tmp_path / "cm.tif", {**prof, "width": 6})
    _write(tmp_path / "f.tif", np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="dtype float32"):
        read_label_mask(tmp_path / "f.tif", prof)


# ------------------------------------------------------------------------ class folders


def test_class_folders(tmp_path):
    from skysense.data.datasets import DatasetError
    from skysense.data.datasets.classification import ClassFolders

    rng = np.random.default_rng(0)
    for c, n in (("forest", 3), ("urban", 2)):
        (tmp_path / c).mkdir()
        for i in range(n):
            _write(
                tmp_path / c / f"{i}.tif",
                rng.integers(0, 255, (3, 40, 48), dtype=np.uint8),
                crs=None,
            )
    (tmp_path / "urban" / "notes.txt").write_text("not an image")
    train = ClassFolders(tmp_path, "train", val_fraction=0.34, size=32)
    val = ClassFolders(tmp_path, "val", val_fraction=0.34, size=32)
    assert train.classes == ["forest", "urban"] and train.sensors == {"hr": "hr_rgb"}
    assert sorted(it["label"] for it in val.items) == [0, 1] and len(train) == 3
    s = val[1]
    assert s["hr"].shape == (3, 32, 32) and s["label"].item() == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty holds no image"):
        ClassFolders(tmp_path, "train")


# --------------------------------------------------------------------- dense crops, collate


def _scene(h=24, w=20, f=4):
    ys, xs = np.mgrid[0:h, 0:w]
    s2 = torch.from_numpy((ys * 100 + xs).astype(np.float32))[None, None].repeat(1, 10, 1, 1)
    hr = torch.from_numpy(np.repeat(np.repeat(ys * 100 + xs, f, 0), f, 1).astype(np.float32))
    mask = torch.from_numpy((xs > 12).astype(np.int64))
    mask[0, 0] = IGNORE_INDEX
    sample = {
        "s2": s2,
        "s2_doy": torch.tensor([100]),
        "s2_valid": torch.tensor([True]),
        "hr": hr[None].repeat(3, 1, 1),
    }
    return DenseScene("t", sample, mask)


def test_dense_crops_keep_every_modality_on_the_same_ground():
    ds = DenseCrops([_scene()], crop=8, length=20, seed=3, focus_class=1, focus=1.0)
    for i in range(20):
        s = ds[i]
        assert s["s2"].shape == (1, 10, 8, 8) and s["hr"].shape == (3, 32, 32)
        # HR pixel (4y + 1, 4x + 2) lies in S2 pixel (y, x): same value after flips and turns.
        torch.testing.assert_close(s["hr"][0, 1::4, 2::4], s["s2"][0, 0])
        assert (s["mask"] == 1).any()  # focus = 1: every crop holds the focus class
    assert torch.equal(ds[7]["s2"], ds[7]["s2"])
    with pytest.raises(ValueError, match="smaller than the crop"):
        DenseCrops([_scene()], crop=32, length=1)


def test_class_weights_favour_the_rare_class():
    w = class_weights([_scene()], 2)
    assert w[1] > w[0] and np.mean(w) == pytest.approx(1.0)


def test_collate_pads_series_and_keeps_boxes_as_lists():
    a = {
        "s2": torch.ones(2, 10, 4, 4),
        "s2_doy": torch.tensor([5, 6]),
        "s2_valid": torch.ones(2, dtype=torch.bool),
        "label": torch.tensor(1),
    }
    b = {
        "s2": torch.ones(3, 10, 4, 4),
        "s2_doy": torch.tensor([5, 6, 7]),
        "s2_valid": torch.ones(3, dtype=torch.bool),
        "label": torch.tensor(0),
    }
    batch = collate([a, b])
    assert batch["s2"].shape == (2, 3, 10, 4, 4)
    assert batch["s2_valid"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["s2_doy"][0, 2] == 0 and batch["s2"][0, 2].abs().sum() == 0
    assert batch["label"].tolist() == [1, 0]
    det = collate(
        [
            {"hr": torch.zeros(3, 8, 8), "boxes": torch.zeros(2, 4), "labels": torch.zeros(2)},
            {"hr": torch.zeros(3, 8, 8), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)},
        ]
    )
    assert isinstance(det["boxes"], list) and det["boxes"][1].shape == (0, 4)
    pair = collate([{"t1": a, "t2": a, "mask": torch.zeros(4, 4)}] * 2)
    assert pair["t1"]["s2"].shape == (2, 2, 10, 4, 4) and pair["mask"].shape == (2, 4, 4)


# ------------------------------------------- public datasets: data=<name> data.root=<fake>

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import fakes  # noqa: E402  (tests/data/fakes: the distributed layouts)

from skysense.tasks import cli  # noqa: E402

_SMALL = [
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.eval_batch_size=2",
    "trainer.threads=1",
]
_DENSE_EVAL = ["task.eval.window=32", "task.eval.overlap=0"]
FINETUNE = {
    "eurosat_ms": ["task=classification"],
    "eurosat_rgb": ["task=classification", "data.size=32"],
    "aid": ["task=classification", "data.size=32"],
    "resisc45": ["task=classification", "data.size=32"],
    "bigearthnet": ["task=multilabel_classification", "data.crop=32"],
    "bigearthnet_v2": ["task=multilabel_classification", "data.crop=32"],
    "oscd": ["task=change_detection", "data.train_cities=null", "data.val_cities=null"]
    + _DENSE_EVAL,
    "levir_cd": ["task=change_detection", "data.crop=32"] + _DENSE_EVAL,
    "whu_cd": ["task=change_detection", "data.crop=32"] + _DENSE_EVAL,
    "potsdam": ["task=segmentation", "data.crop=32"] + _DENSE_EVAL,
    "isaid": ["task=segmentation", "data.crop=32"] + _DENSE_EVAL,
    "sen1floods11": ["task=multimodal_segmentation", "data.crop=16"] + _DENSE_EVAL,
    "pastis": ["task=multimodal_segmentation", "task.features=s2", "data.crop=16"]
    + ["task.eval.window=16", "task.eval.overlap=0"],
    "dior": ["task=detection", "data.crop=64"],
    "dior_r": ["task=detection", "data.crop=64"],
    "fair1m": ["task=detection", "data.crop=64"],
    "fmow_s2": ["task=classification", "data.size=32"],
    "hls_burn_scars": ["task=segmentation", "data.crop=16"] + _DENSE_EVAL,
    "mados": ["task=segmentation", "data.crop=16"] + _DENSE_EVAL,
    "dynamicearthnet": ["task=segmentation", "data.crop=32"] + _DENSE_EVAL,
}


# fMoW's 62-class confusion plot alone takes seconds.
_SLOW = {"fmow_s2"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(FINETUNE)]
)
def test_finetune_two_steps_on_each_public_dataset(name, tmp_path):
    """``skysense finetune data=<name> data.root=<fake in the distributed layout>``."""
    if name == "bigearthnet_v2":
        pytest.importorskip("pyarrow", reason="metadata.parquet needs pyarrow")
    root = fakes.make(name, tmp_path / "root")
    run = tmp_path / "run"
    argv = ["finetune", *FINETUNE[name], f"data={name}", f"data.root={root}", f"run_dir={run}"]
    assert cli.main(argv + _SMALL) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == name and summary["runs"]["random"]["steps"] == 2
    if name == "oscd":
        assert summary["data_info"]["val"] == ["paris"]  # images/test.txt
    else:
        assert summary["data_info"]["val"] >= 1
    m = json.loads((run / "random" / "metrics.json").read_text())
    assert all(np.isfinite(h["loss"]) for h in m["history"]) and len(m["history"]) == 2
    if name in ("dior_r", "fair1m"):  # oriented ground truth: rotated-box AP50 reported too
        assert 0.0 <= m["metrics"]["rotated_mAP50"] <= 1.0
    if name.startswith(("dior", "fair1m")):  # task.head.oriented: auto = on for oriented data
        saved = safe_load(run / "random" / "model.pt")
        oriented = name != "dior"
        assert saved["meta"]["head"]["oriented"] is oriented
        assert any("obb" in k for k in saved["state_dict"]) is oriented


@pytest.mark.parametrize(
    "extra",
    [
        # Dyna.-S2: a series of 3 monthly S2 composites (one month absent in the fake).
        ["data.modalities=[s2]", "data.months=3", "data.crop=16"]
        + ["task.eval.window=16", "task.eval.overlap=0"],
        # Dyna.-MM: Planet + S2 + S1 fused; an S2 pixel over 8 x 8 Planet pixels, as the model
        # fuses them (data.grid_factor=8), the 8 S1 channels named.
        ["data.modalities=[hr,s2,s1]", "data.s1_bands=[VV,VH,a,b,c,d,e,f]", "data.months=2"]
        + ["data.grid_factor=8", "data.crop=8", "task.eval.window=8", "task.eval.overlap=0"],
    ],
    ids=["s2_series", "planet_s2_s1"],
)
def test_finetune_two_steps_on_dynamicearthnet_composites(extra, tmp_path):
    root = fakes.make("dynamicearthnet", tmp_path / "root")
    run = tmp_path / "run"
    argv = ["finetune", "task=multimodal_segmentation", "data=dynamicearthnet", *extra]
    assert cli.main(argv + [f"data.root={root}", f"run_dir={run}"] + _SMALL) == 0
    mods = extra[0].split("=")[1].strip("[]").split(",")
    meta = torch.load(run / "random" / "model.pt", weights_only=True, map_location="cpu")["meta"]
    # The S2 grid is the reference (the mask's grid), whatever order the modalities are given.
    assert set(meta["inputs"]["modalities"]) == set(mods) and meta["inputs"]["reference"] == "s2"
    m = json.loads((run / "random" / "metrics.json").read_text())
    assert len(m["history"]) == 2 and all(np.isfinite(h["loss"]) for h in m["history"])
    assert 0.0 <= m["metrics"]["mIoU"] <= 1.0


def test_multispectral_class_folders_feed_the_s2_encoder(tmp_path, capsys):
    root = fakes.make("eurosat_ms", tmp_path / "root") / "EuroSAT_MS"
    base = ["finetune", "task=classification", "data=class_folders", f"data.root={root}"]
    cfg = cli.compose(
        cli.COMMANDS["finetune"].config, base[1:] + ["task.features=s2", f"run_dir={tmp_path}"]
    )
    from skysense.tasks.downstream.data import build_task_data

    data = build_task_data(cfg.data, 2, 0, "s2")
    assert data.inputs["sensors"] == {"s2": "s2_l1c"}
    # data.size (128) resizes HR images only: the S2 patches keep their 64 x 64 10 m pixels.
    assert data.train[0]["s2"].shape == (1, 10, 64, 64)
    # Class folders default to the images' own modality: S2 stacks feed the S2 encoder.
    default = cli.compose(cli.COMMANDS["finetune"].config, base[1:] + [f"run_dir={tmp_path}"])
    assert default.task.features == "auto"
    # HR features asked for on S2 data: one line naming the fix.
    with pytest.raises(cli.ConfigError, match="task.features.*only \\['s2'\\]"):
        from skysense.tasks.downstream.run import finetune

        finetune(
            cli.compose(
                cli.COMMANDS["finetune"].config,
                base[1:] + ["task.features=hr", f"run_dir={tmp_path}"],
            )
        )
    # An RGB sensor declared for them: one line naming the file and both band lists.
    assert cli.main(base + ["data.sensor=hr_rgb", f"run_dir={tmp_path}"] + _SMALL) != 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "bands found" in ln)
    assert re.search(r"_\d\.tif: bands found B1 B2 .* B12 B8A \(13\), expected R G B \(3\)", line)
    assert "set data.sensor=s2_l1c" in line


def test_hr_change_pairs_finetune_evaluate_and_infer(tmp_path):
    """LEVIR-CD pairs: the siamese Swin + UperNet change model through finetune, evaluate, and
    infer (two georeferenced scenes in, a COG of change classes out)."""
    import rasterio
    from affine import Affine
    from fakes.common import write_tif
    from PIL import Image

    root = fakes.make("levir_cd", tmp_path / "levir")
    run = tmp_path / "run"
    base = ["task=change_detection", "data=levir_cd", f"data.root={root}"]
    base += [f"run_dir={run}", *_DENSE_EVAL, "trainer.threads=1"]
    assert cli.main(["finetune", *base, "data.crop=32", *_SMALL]) == 0
    assert cli.main(["evaluate", *base]) == 0
    m = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert np.array(m["metrics"]["confusion_matrix"]).sum() == 2 * 64 * 64  # the 2 val pairs
    for k in ("A", "B"):
        a = np.asarray(Image.open(root / "val" / k / "val_1.png")).transpose(2, 0, 1)
        write_tif(tmp_path / f"{k}.tif", a, "EPSG:32650", Affine(0.5, 0, 4e5, 0, -0.5, 3e6))
    argv = ["infer", str(tmp_path / "A.tif"), str(tmp_path / "change.tif")]
    argv += [f"checkpoint={run / 'random' / 'model.pt'}", f"src2={tmp_path / 'B.tif'}"]
    assert cli.main(argv + ["threads=1", "progress=false"]) == 0
    with rasterio.open(tmp_path / "change.tif") as ds:
        assert ds.shape == (64, 64) and ds.crs.to_epsg() == 32650 and ds.dtypes[0] == "uint8"
        assert set(np.unique(ds.read(1)).tolist()) <= {0, 1}

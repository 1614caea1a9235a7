"""The public-dataset readers of skysense.data.datasets on fakes written in each dataset's
distributed layout (tests/data/fakes), and on the shared OSCD / BigEarthNet samples: bands by
name, splits from the dataset's own files, one-line errors for misreads, plot()."""

from __future__ import annotations

import json
import shutil

import fakes
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from fakes.change import oscd_band_value
from fakes.classification import EUROSAT_CLASSES, eurosat_value
from fakes.common import write_tif
from rasterio.warp import Resampling, reproject

from skysense.data.datasets import BandMismatchError, DatasetError, get_dataset
from skysense.data.datasets.classification import ClassFolders, EuroSATMS
from skysense.data.datasets.readers import check_range, read_image
from skysense.data.sensors import get_sensor

pytestmark = pytest.mark.unit

S2 = get_sensor("s2_l1c")


def _raw(x: torch.Tensor, sensor: str = "s2_l1c") -> np.ndarray:
    """Normalised (C, H, W) -> the values as read."""
    spec = get_sensor(sensor)
    m = np.asarray(spec.mean, np.float32)[:, None, None]
    s = np.asarray(spec.std, np.float32)[:, None, None]
    return x.numpy() * s + m


def _check_eurosat_bands(sample: dict, class_index: int) -> None:
    raw = _raw(sample["s2"][0])
    for j, b in enumerate(S2.model_bands):
        lo = eurosat_value(b, class_index)
        assert lo <= raw[j].min() + 1e-2 and raw[j].max() <= lo + 6 + 1e-2, b


# ------------------------------------------------------------------ EuroSAT and class folders


def test_eurosat_ms_b8a_last_is_mapped_by_name(tmp_path):
    root = fakes.make("eurosat_ms", tmp_path)
    ds = EuroSATMS(root, "train")
    assert ds.sensors == {"s2": "s2_l1c"} and len(ds) == len(EUROSAT_CLASSES)
    s = ds[0]
    assert s["s2"].shape == (1, 10, 64, 64) and s["s2_doy"].tolist() == [0]
    _check_eurosat_bands(s, int(s["label"]))
    assert torch.isfinite(s["latlon"]).all()  # UTM patch -> centre lat/lon
    # The split files list <Class>_<n>.jpg: train = n 1, val = n 2.
    assert [ds.item_name(i) for i in range(3)] == [f"{c}_1" for c in EUROSAT_CLASSES]
    assert [it["name"] for it in EuroSATMS(root, "val").items][0] == "AnnualCrop_2"


def test_13_band_s2_in_class_folders_goes_to_the_s2_encoder_by_name(tmp_path):
    root = fakes.make("eurosat_ms", tmp_path)
    ds = ClassFolders(root / "EuroSAT_MS", "train", val_fraction=0.34)
    assert ds.sensors == {"s2": "s2_l1c"}  # EuroSAT's class names select its band order
    s = ds[0]
    assert "hr" not in s and s["s2"].shape[1] == 10
    _check_eurosat_bands(s, int(s["label"]))


def test_band_descriptions_win_over_position(tmp_path):
    root = fakes.make_eurosat_ms(tmp_path, descriptions=True)
    (root / "EuroSAT_MS" / "AnnualCrop").rename(root / "EuroSAT_MS" / "fields")
    ds = ClassFolders(root / "EuroSAT_MS", "train", val_fraction=0.34)
    assert ds.sensors == {"s2": "s2_l1c"} and ds.classes == ["Forest", "River", "fields"]
    for i in range(len(ds)):
        s = ds[i]
        k = EUROSAT_CLASSES.index(ds.classes[int(s["label"])].replace("fields", "AnnualCrop"))
        _check_eurosat_bands(s, k)


def test_13_unnamed_bands_outside_eurosat_are_an_error(tmp_path):
    root = fakes.make("eurosat_ms", tmp_path)
    (root / "EuroSAT_MS" / "AnnualCrop").rename(root / "EuroSAT_MS" / "fields")
    with pytest.raises(DatasetError, match="order is ambiguous.*band_order") as e:
        ClassFolders(root / "EuroSAT_MS", "train", val_fraction=0.34)
    assert "\n" not in str(e.value) and ".tif" in str(e.value)
    ds = ClassFolders(root / "EuroSAT_MS", "train", val_fraction=0.34, band_order="eurosat")
    assert ds.sensors == {"s2": "s2_l1c"}


def test_multispectral_where_rgb_is_expected_is_one_line(tmp_path):
    root = fakes.make_eurosat_ms(tmp_path, descriptions=True)
    ds = ClassFolders(root / "EuroSAT_MS", "train", sensor="hr_rgb", val_fraction=0.34)
    with pytest.raises(BandMismatchError) as e:
        ds[0]
    msg = str(e.value)
    assert "\n" not in msg and ds.items[0]["path"].name in msg
    assert "found B1 B2 B3" in msg and "expected R G B" in msg and "s2_l1c" in msg
    # Without band descriptions: the file's 13 unnamed bands.
    root2 = fakes.make_eurosat_ms(tmp_path / "plain")
    (root2 / "EuroSAT_MS" / "Forest").rename(root2 / "EuroSAT_MS" / "woods")
    ds = ClassFolders(root2 / "EuroSAT_MS", "train", sensor="hr_rgb", val_fraction=0.34)
    with pytest.raises(BandMismatchError, match="13 unnamed uint16 bands.*expected R G B"):
        ds[0]


def test_rgb_where_multispectral_is_expected_is_one_line(tmp_path):
    root = fakes.make("eurosat_rgb", tmp_path)
    ds = ClassFolders(root / "2750", "train", sensor="s2_l1c", val_fraction=0.34)
    with pytest.raises(BandMismatchError) as e:
        ds[0]
    msg = str(e.value)
    assert "\n" not in msg and ".jpg" in msg
    assert "found R G B (3)" in msg and "expected B2 B3 B4 B5 B6 B7 B8 B8A B11 B12" in msg
    assert "hr_rgb" in msg


def test_dtype_band_count_and_value_range_checks(tmp_path):
    t = Affine(10, 0, 500000, 0, -10, 5000000)
    rgb16 = write_tif(tmp_path / "rgb16.tif", np.full((3, 8, 8), 300, np.uint16), "EPSG:32631",
                      t, descriptions=["red", "green", "blue"])  # fmt: skip
    with pytest.raises(DatasetError, match="dtype uint16 does not match sensor hr_rgb"):
        read_image(rgb16, "hr_rgb")
    five = write_tif(tmp_path / "five.tif", np.ones((5, 8, 8), np.uint16), "EPSG:32631", t)
    with pytest.raises(DatasetError, match="name no known sensor"):
        read_image(five, None)
    refl = write_tif(tmp_path / "refl.tif", np.full((12, 8, 8), 0.2, np.float32), "EPSG:32631", t)
    with pytest.raises(DatasetError, match="look like reflectance 0-1"):
        read_image(refl, "s2_l2a")
    with pytest.raises(DatasetError, match="look like linear power"):
        check_range("s1.tif", np.full((2, 4, 4), 0.05, np.float32), get_sensor("s1_grd_db"))
    with pytest.raises(DatasetError, match="outside the range"):
        check_range("db.tif", np.full((2, 4, 4), -200.0, np.float32), get_sensor("s1_grd_db"))
    ok = write_tif(tmp_path / "ok.tif", np.full((12, 8, 8), 900, np.uint16), "EPSG:32631", t)
    arr, sensor = read_image(ok, None)
    assert sensor == "s2_l2a" and arr.shape == (10, 8, 8)


def test_split_file_overrides_and_names_missing_items(tmp_path):
    root = fakes.make("eurosat_rgb", tmp_path)
    f = tmp_path / "mine.txt"
    f.write_text("Forest_3.jpg\nRiver_1.jpg\n")
    ds = get_dataset("eurosat_rgb")(root, "train", split_file=f)
    assert [it["name"] for it in ds.items] == ["Forest_3", "River_1"]
    f.write_text("Forest_9.jpg\n")
    with pytest.raises(DatasetError, match="not under.*Forest_9"):
        get_dataset("eurosat_rgb")(root, "train", split_file=f)


def test_aid_and_resisc45_splits(tmp_path):
    aid = fakes.make("aid", tmp_path / "aid")
    tr, va = get_dataset("aid")(aid, "train"), get_dataset("aid")(aid, "val")
    assert len(tr) == 3 and len(va) == 12  # 20 % of 5 per class trains
    assert not {it["name"] for it in tr.items} & {it["name"] for it in va.items}
    assert tr.classes[int(tr[0]["label"])] in ("Airport", "Beach", "Forest")
    r = fakes.make("resisc45", tmp_path / "r")
    ds = get_dataset("resisc45")(r, "test", size=32)
    assert ds[0]["hr"].shape == (3, 32, 32) and len(ds.classes) == 45


# ------------------------------------------------------------------ OSCD


def test_oscd_date_2_on_another_grid_is_resampled_onto_date_1(tmp_path):
    root = fakes.make("oscd", tmp_path)
    ds = get_dataset("oscd")(root, "train")
    assert [it["name"] for it in ds.items] == ["aguasclaras", "bercy"]  # images/train.txt
    s = ds[1]
    assert s["t1"]["s2"].shape == s["t2"]["s2"].shape == (1, 10, 48, 48)
    assert s["mask"].shape == (48, 48) and set(s["mask"].unique().tolist()) <= {0, 1, 255}
    assert (s["mask"] == 1).sum() == 12 * 14
    assert s["t1"]["s2_doy"].tolist() == [193] and s["t2"]["s2_doy"].tolist() == [288]
    # Date 2's B2 on date 1's grid equals the planted ground pattern (interior pixels).
    rows, cols = np.mgrid[0:48, 0:48] + 0.5
    want = oscd_band_value("B02", 2, rows, cols)
    got = _raw(s["t2"]["s2"][0])[0]
    assert np.abs(got - want)[4:-4, 4:-4].max() < 8.0
    assert ds.plot(s, tmp_path / "oscd.png").stat().st_size > 3000


def test_oscd_mask_values_are_checked(tmp_path):
    root = fakes.make("oscd", tmp_path)
    with pytest.raises(DatasetError, match=r"values \[2\] not in label_values \[0, 1\]"):
        get_dataset("oscd")(root, "train", label_values={0: 0, 1: 1})[0]


def test_shared_oscd_city_with_date_2_on_another_grid(shared_data, tmp_path):
    src = shared_data / "oscd"
    city = "rennes"
    root = tmp_path / "oscd"
    (root / "images" / city).mkdir(parents=True)
    (root / "images" / city / "imgs_1").symlink_to(src / "images" / city / "imgs_1")
    shutil.copy(src / "images" / city / "dates.txt", root / "images" / city)
    (root / "labels").mkdir()
    (root / "labels" / city).symlink_to(src / "labels" / city)
    # Date 2 resampled onto a grid of 0.85 x the pixel, shifted by a third of a pixel.
    for f in sorted((src / "images" / city / "imgs_2").glob("*.tif")):
        with rasterio.open(f) as ds:
            a, t = ds.read(1), ds.transform
            px = 0.85 * t.a
            nt = Affine(px, 0, t.c + t.a / 3, 0, -px, t.f - t.a / 3)
            h, w = int(ds.height / 0.85) - 1, int(ds.width / 0.85) - 1
            out = np.zeros((h, w), np.uint16)
            reproject(a, out, src_transform=t, src_crs=ds.crs, dst_transform=nt,
                      dst_crs=ds.crs, resampling=Resampling.bilinear)  # fmt: skip
            write_tif(root / "images" / city / "imgs_2" / f.name, out, ds.crs, nt)
    moved = get_dataset("oscd")(root, "val", cities=[city])[0]
    orig = get_dataset("oscd")(src, "val", cities=[city])[0]
    assert moved["t2"]["s2"].shape == orig["t2"]["s2"].shape == orig["t1"]["s2"].shape
    assert torch.equal(moved["t1"]["s2"], orig["t1"]["s2"])
    a = orig["t2"]["s2"][0, :3, 5:-5, 5:-5].flatten().numpy()
    b = moved["t2"]["s2"][0, :3, 5:-5, 5:-5].flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert moved["mask"].shape == orig["mask"].shape


def test_shared_oscd_cities_read_through_the_class(shared_data):
    with pytest.raises(DatasetError, match="no split file .*train.txt; name the cities .*rennes"):
        get_dataset("oscd")(shared_data / "oscd", "train")  # this copy has no split files
    ds = get_dataset("oscd")(shared_data / "oscd", "val", cities=["paris", "nantes"])
    for i in range(len(ds)):
        s = ds[i]
        assert s["t1"]["s2"].shape[-2:] == s["mask"].shape
        assert 0 < (s["mask"] == 1).float().mean() < 0.2


# ------------------------------------------------------------------ BigEarthNet


def test_bigearthnet_v1_official_split_and_19_classes(tmp_path):
    root = fakes.make("bigearthnet", tmp_path)
    cls = get_dataset("bigearthnet")
    tr = cls(root, "train", modalities=["s2", "s1"])
    assert len(tr) == 3 and len(cls(root, "val")) == 1 and len(cls(root, "test")) == 1
    s = tr[0]
    assert s["s2"].shape == (1, 10, 120, 120) and s["s1"].shape == (1, 2, 120, 120)
    assert s["s2_doy"].tolist() == [164]
    names = [tr.classes[k] for k in torch.nonzero(s["label"]).flatten().tolist()]
    assert names == ["Arable land", "Pastures"]
    # "Airports" has no 19-class label; "Transitional woodland/shrub" is renamed.
    lab = cls(root, "val")[0]["label"]
    assert [tr.classes[k] for k in torch.nonzero(lab).flatten().tolist()] == [
        "Broad-leaved forest",
        "Transitional woodland, shrub",
    ]
    assert cls(root, "val", nomenclature=43)[0]["label"].sum() == 3
    raw = _raw(s["s2"][0], "s2_l2a")  # B8A is the 9th file band
    assert abs(raw[7].mean() - (300 + 150 * 8)) < 60


def test_bigearthnet_v2_metadata_parquet(tmp_path):
    pytest.importorskip("pyarrow", reason="bigearthnet_v2 reads metadata.parquet with pyarrow")
    root = fakes.make("bigearthnet_v2", tmp_path)
    cls = get_dataset("bigearthnet_v2")
    assert len(cls(root, "train")) == 3 and len(cls(root, "test")) == 1
    va = cls(root, "val", modalities=["s2", "s1"])
    s = va[0]
    assert s["s1"].shape == (1, 2, 120, 120)
    assert [va.classes[k] for k in torch.nonzero(s["label"]).flatten().tolist()] == [
        "Broad-leaved forest",
        "Transitional woodland, shrub",
    ]


def test_shared_bigearthnet_reads_through_the_class(shared_data):
    cls = get_dataset("bigearthnet")
    root = shared_data / "bigearthnet"
    tr, va = cls(root, "train", modalities=["s2", "s1"]), cls(root, "val", modalities=["s2", "s1"])
    assert len(tr) + len(va) == 6 and not {i["name"] for i in tr.items} & {
        i["name"] for i in va.items
    }
    s = va[0]
    assert s["s2"].shape == (1, 10, 120, 120) and s["s1"].shape == (1, 2, 120, 120)
    assert s["label"].shape == (19,) and s["label"].sum() >= 1


# ------------------------------------------------------------------ HR change pairs


def test_levir_and_whu_pairs(tmp_path):
    lev = get_dataset("levir_cd")(fakes.make("levir_cd", tmp_path / "l"), "val")
    s = lev[0]
    assert s["t1"]["hr"].shape == s["t2"]["hr"].shape == (3, 64, 64)
    assert set(s["mask"].unique().tolist()) == {0, 1}
    whu_root = fakes.make("whu_cd", tmp_path / "w")
    assert [it["name"] for it in get_dataset("whu_cd")(whu_root, "val").items] == ["4", "5"]
    (whu_root / "list" / "test.txt").unlink()
    with pytest.raises(DatasetError, match="no list/test.txt"):
        get_dataset("whu_cd")(whu_root, "test")


def test_levir_label_values_are_checked(tmp_path):
    root = fakes.make("levir_cd", tmp_path)
    with pytest.raises(DatasetError, match=r"values \[255\] not in label_values \[0, 1\]"):
        get_dataset("levir_cd")(root, "train", label_values={0: 0, 1: 1})[0]


# ------------------------------------------------------------------ every fake: read + plot


@pytest.mark.parametrize("name", sorted(fakes.MAKERS))
def test_every_fake_reads_and_plots(name, tmp_path):
    if name == "bigearthnet_v2":
        pytest.importorskip("pyarrow", reason="metadata.parquet needs pyarrow")
    root = fakes.make(name, tmp_path / "root")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 200_000
    ds = get_dataset(name)(root, "train")
    assert len(ds) > 0 and ds.describe()["task"] == ds.task
    s = ds[0]
    png = ds.plot(s, tmp_path / f"{name}.png", title=name)
    assert png.stat().st_size > 3000


# ------------------------------------------------------------------ segmentation tiles


def test_potsdam_colour_labels_and_eroded_boundaries(tmp_path):
    root = fakes.make("potsdam", tmp_path)
    cls = get_dataset("potsdam")
    tr, te = cls(root, "train"), cls(root, "test")
    assert [it["name"] for it in tr.items] == ["2_10", "2_11"] and len(te) == 1
    m = tr[0]["mask"]
    assert m[0, 0] == 0  # (250, 250, 250) thresholded to white = impervious surfaces
    assert set(m.unique().tolist()) == set(range(6))
    er = cls(root, "train", eroded=True)[0]["mask"]
    assert (er[::8] == 255).all() and torch.equal(er[1::8], m[1::8])


def test_colour_label_outside_the_palette_is_an_error(tmp_path):
    root = fakes.make("isaid", tmp_path)
    lab = root / "train" / "Semantic_masks" / "images" / "P0000_instance_color_RGB.png"
    from PIL import Image

    img = np.asarray(Image.open(lab)).copy()
    Image.fromarray(img[..., ::-1].copy()).save(lab)  # BGR: ship (0,0,63) becomes (63,0,0)
    with pytest.raises(DatasetError, match=r"outside the palette \(most: \(63,0,0\)"):
        get_dataset("isaid")(root, "train")[0]


def test_isaid_palette_matches_the_devkit_colour_keys():
    """The iSAID devkit (helpers/labels.py) keys each class by R + 256 G + 65536 B of the
    colour its converter reads from the semantic PNG (in R G B order), background first."""
    from skysense.data.datasets.segmentation import ISAID_CLASSES, ISAID_PALETTE

    devkit_keys = [0, 4128768, 4144896, 16128, 8339200, 12533504, 16727808, 4161280, 8355584,
                   8323072, 12517376, 16711680, 8371968, 12549888, 16744192, 10183680]  # fmt: skip
    assert [r + 256 * g + 65536 * b for r, g, b in ISAID_PALETTE] == devkit_keys
    assert ISAID_CLASSES[1] == "ship" and ISAID_CLASSES[14] == "plane"
    assert len(set(ISAID_PALETTE)) == len(ISAID_CLASSES) == 16


def test_sen1floods11_s1_s2_and_ignored_labels(tmp_path):
    root = fakes.make("sen1floods11", tmp_path)
    ds = get_dataset("sen1floods11")(root, "train")
    s = ds[0]
    assert s["s2"].shape == (1, 10, 32, 32) and s["s1"].shape == (1, 2, 32, 32)
    assert not s["s1_pixel_valid"][0, 0, :3].any() and s["s1_pixel_valid"][0, 5].all()
    assert (s["mask"][-3:] == 255).all() and set(s["mask"][:-3].unique().tolist()) == {0, 1}
    # B8A (file band 9 of 13, value 300/1500 + 50 * 8) is mapped by name.
    raw = _raw(s["s2"][0])
    assert abs(raw[7].max() - (1500 + 50 * 8)) < 6
    assert len(get_dataset("sen1floods11")(root, "test", modalities=["s1"])) == 1


def test_pastis_folds_dates_and_void(tmp_path):
    root = fakes.make("pastis", tmp_path)
    cls = get_dataset("pastis")
    tr = cls(root, "train", modalities=["s2", "s1"])
    assert [it["name"] for it in tr.items] == ["10000", "10001"]  # folds 1-3
    assert [it["name"] for it in cls(root, "val").items] == ["10002"]
    s = tr[1]
    assert s["s2"].shape == (3, 10, 16, 16) and s["s2_doy"].tolist() == [267, 287, 74]
    assert s["s1"].shape == (2, 2, 16, 16) and s["s1_doy"].tolist() == [263, 314]
    assert (s["mask"] == 19).sum() == 0 and (s["mask"] == 255).any()
    assert 45 < float(s["latlon"][0]) < 52  # Lambert-93 -> France
    assert cls(root, "train", max_steps=2)[1]["s2_doy"].tolist() == [267, 74]


# ------------------------------------------------------------------ detection, oriented boxes


def test_dior_voc_boxes_and_dior_r_polygons(tmp_path):
    root = fakes.make("dior", tmp_path)
    tr = get_dataset("dior")(root, "train")
    s = tr[0]
    assert s["boxes"].tolist() == [[10, 12, 40, 38], [50, 50, 90, 80]]
    assert [tr.classes[k] for k in s["labels"].tolist()] == ["airplane", "Expressway-Service-area"]
    assert get_dataset("dior")(root, "test")[0]["hr"].shape == (3, 96, 96)  # JPEGImages-test
    r = get_dataset("dior_r")(root, "train")[0]
    assert r["polygons"].shape == (2, 8) and torch.equal(r["boxes"], s["boxes"])
    xml = root / "Annotations" / "Horizontal Bounding Boxes" / "00003.xml"
    xml.write_text(xml.read_text().replace("storagetank", "submarine"))
    with pytest.raises(DatasetError, match="00003.xml: class 'submarine' is not one of the 20"):
        get_dataset("dior")(root, "val")[0]


def test_fair1m_points_and_splits(tmp_path):
    root = fakes.make("fair1m", tmp_path)
    tr = get_dataset("fair1m")(root, "train")
    assert [it["name"] for it in tr.items] == ["0", "1"]
    s = tr[0]
    assert s["polygons"][0].tolist() == [10, 10, 40, 10, 40, 30, 10, 30]
    assert [tr.classes[k] for k in s["labels"].tolist()] == ["Boeing737", "Small Car"]
    assert len(get_dataset("fair1m")(root, "val")) == 1


def test_polygon_iou_and_rotated_map():
    from skysense.data.datasets.oriented import polygon_iou, rotated_map

    sq = [0, 0, 2, 0, 2, 2, 0, 2]
    assert polygon_iou(sq, sq) == pytest.approx(1.0)
    assert polygon_iou(sq, [1, 0, 3, 0, 3, 2, 1, 2]) == pytest.approx(2 / 6)
    # A square turned 45 degrees about the same centre: intersection = octagon of area
    # 8 (sqrt 2 - 1) for side 2.
    d = np.sqrt(2)
    diamond = [1, 1 - d, 1 + d, 1, 1, 1 + d, 1 - d, 1]
    inter = 8 * (np.sqrt(2) - 1)
    assert polygon_iou(sq, diamond) == pytest.approx(inter / (8 - inter), rel=1e-6)
    clockwise = np.asarray(diamond).reshape(4, 2)[::-1].reshape(-1)
    assert polygon_iou(sq, clockwise) == pytest.approx(inter / (8 - inter), rel=1e-6)
    tgt = [{"polygons": np.array([sq, [5, 5, 7, 5, 7, 7, 5, 7]]), "labels": np.array([0, 1])}]
    perfect = [
        {"polygons": tgt[0]["polygons"], "scores": np.array([0.9, 0.8]), "labels": tgt[0]["labels"]}
    ]
    assert rotated_map(perfect, tgt)["mAP"] == pytest.approx(1.0)
    miss = [{"polygons": np.array([[10, 10, 12, 10, 12, 12, 10, 12], sq]),
             "scores": np.array([0.95, 0.9]), "labels": np.array([0, 0])}]  # fmt: skip
    res = rotated_map(miss, tgt)
    assert res["per_class"][0] == pytest.approx(0.5) and res["per_class"][1] == 0.0


def test_fmow_s2_rows_dates_and_bands(tmp_path):
    root = fakes.make("fmow_s2", tmp_path)
    cls = get_dataset("fmow_s2")
    tr = cls(root, "train", size=32)
    assert len(tr) == 4 and len(cls(root, "val")) == 1 and len(cls(root, "test")) == 1
    s = tr[2]
    assert tr.classes[int(s["label"])] == "crop_field" and s["s2_doy"].tolist() == [256]
    assert s["s2"].shape == (1, 10, 32, 32)
    raw = _raw(s["s2"][0])
    for j, b in enumerate(S2.model_bands):  # wavelength order: B8A is file band 9
        assert abs(raw[j].mean() - (1000 + 100 * S2.bands.index(b))) < 1.0, b


def test_hls_burn_scars_bands_by_name_and_missing_bands(tmp_path):
    root = fakes.make("hls_burn_scars", tmp_path)
    ds = get_dataset("hls_burn_scars")(root, "train")
    assert len(ds) == 2 and len(get_dataset("hls_burn_scars")(root, "val")) == 1
    s = ds[0]
    assert s["s2_doy"].tolist() == [190] and s["s2"].shape == (1, 10, 32, 32)
    raw = _raw(s["s2"][0], "s2_l2a")
    bands = get_sensor("s2_l2a").model_bands
    for j, b in enumerate(("B2", "B3", "B4", "B8A", "B11", "B12")):  # file order
        assert raw[bands.index(b), 0, 0] == pytest.approx(100.0 * (j + 1), abs=0.05)
    for b in ("B5", "B6", "B7", "B8"):  # absent from HLS: the mean, 0 once normalised
        assert float(s["s2"][0, bands.index(b)].abs().max()) == 0.0
    assert (s["mask"][:2] == 255).all() and set(s["mask"][2:].unique().tolist()) == {0, 1}


def test_hr_tiles_read_a_window_as_the_whole_tile_cut(tmp_path):
    from rasterio.windows import Window

    ds = get_dataset("potsdam")(fakes.make("potsdam", tmp_path), "train")
    assert ds.tile_shape(1) == (64, 64)
    whole, part = ds[1], ds.read_window(1, Window(8, 16, 32, 24))
    assert torch.equal(part["hr"], whole["hr"][:, 16:40, 8:40])
    assert torch.equal(part["mask"], whole["mask"][16:40, 8:40])


def test_bigearthnet_split_file_with_s1_partners_and_missing_patches(tmp_path):
    root = fakes.make("bigearthnet", tmp_path)
    s2 = sorted(p.name for p in (root / "BigEarthNet-v1.0").iterdir())
    s1 = sorted(p.name for p in (root / "BigEarthNet-S1-v1.0").iterdir())
    f = tmp_path / "pairs.csv"
    f.write_text(f"{s2[1]},{s1[1]}\n{s2[4]},{s1[4]}\n")
    ds = get_dataset("bigearthnet")(root, "train", split_file=f, modalities=["s2", "s1"])
    assert [(it["s2"].name, it["s1"].name) for it in ds.items] == [(s2[1], s1[1]), (s2[4], s1[4])]
    assert ds[1]["s1"].shape == (1, 2, 120, 120)
    f.write_text("S2A_MSIL2A_20170613T101031_99_99\n")
    with pytest.raises(DatasetError, match="99_99 of the split file has no S2 folder"):
        get_dataset("bigearthnet")(root, "train", split_file=f)


def test_bigearthnet_label_json_errors_name_the_file(tmp_path):
    root = fakes.make("bigearthnet", tmp_path)
    ds = get_dataset("bigearthnet")(root, "val")
    meta = next(ds.items[0]["s2"].glob("*_labels_metadata.json"))
    meta.write_text(json.dumps({"labels": "Pastures"}))
    with pytest.raises(DatasetError, match="labels_metadata.json: 'labels' must be a list"):
        ds[0]
    meta.write_text("{not json")
    with pytest.raises(DatasetError, match="labels_metadata.json: unreadable JSON"):
        ds[0]


def test_mados_bands_by_wavelength_and_sparse_labels(tmp_path):
    from fakes.segmentation import mados_value

    root = fakes.make("mados", tmp_path)
    ds = get_dataset("mados")(root, "train")
    assert [it["name"] for it in ds.items] == ["Scene_0_1", "Scene_1_1"]
    for s in (ds[0], ds[1]):  # Scene_1: Sentinel-2B wavelengths (1614, 2202 nm)
        assert s["s2"].shape == (1, 10, 36, 36)
        raw = _raw(s["s2"][0], "s2_l2a")
        for j, b in enumerate(get_sensor("s2_l2a").model_bands):
            assert raw[j, 20, 20] == pytest.approx(10000 * mados_value(b), abs=0.5), b
        assert not s["s2_pixel_valid"][0, 0, 0]
        assert set(s["mask"].unique().tolist()) == {0, 6, 255}  # debris, water, unlabelled


def test_dynamicearthnet_planet_bgr_by_name_and_one_hot_labels(tmp_path):
    root = fakes.make("dynamicearthnet", tmp_path)
    cls = get_dataset("dynamicearthnet")
    ds = cls(root, "train")
    assert len(ds) == 2 and len(cls(root, "val")) == 1
    s = ds[1]
    assert s["hr"].shape == (3, 64, 64) and int(s["hr_doy"]) == 32  # 2018-02-01
    raw = _raw(s["hr"], "hr_rgb")  # R G B from the file's B G R: B = 500 -> 42.5, G = 85
    assert raw[2].mean() == pytest.approx(500 / 3000 * 255, abs=0.01)
    assert raw[1].mean() == pytest.approx(1000 / 3000 * 255, abs=0.01)
    assert set(s["mask"].unique().tolist()) == set(range(6)) | {255}  # snow & ice ignored
    assert cls(root, "train", day=5)[0]["hr_doy"] == 5
    # The split lists as the authors wrote them: /reprocess-cropped/UTM-24000/... -> planet/.
    assert (
        "/reprocess-cropped/UTM-24000/" in (root / "dynnet_training_splits/train.txt").read_text()
    )
    assert ds.items[0]["image"].parts[-6] == "planet"


def test_dynamicearthnet_monthly_s2_series_by_name_on_a_coarser_grid(tmp_path):
    from fakes.segmentation import den_s2_value

    from skysense.data.datasets.readers import S2_L2A_ORDER

    root = fakes.make("dynamicearthnet", tmp_path)
    cls = get_dataset("dynamicearthnet")
    ds = cls(root, "train", modalities=["hr", "s2"], months=3)
    assert ds.modalities == ["s2", "hr"]  # the mask's grid (S2) comes first
    s = ds[0]  # label 2018-01: composites 2017-11, (2017-12 absent), 2018-01
    assert s["s2"].shape == (2, 10, 32, 32) and s["s2_doy"].tolist() == [319, 15]
    assert s["s2_valid"].all() and s["s2_pixel_valid"].all()
    # 10 m over a 3 m label grid: factor 2 (6 m); the Planet image stays 2 x finer.
    assert s["hr"].shape == (3, 64, 64) and s["mask"].shape == (32, 32)
    raw = _raw(s["s2"][1], "s2_l2a")
    for j, b in enumerate(get_sensor("s2_l2a").model_bands):  # file order = Level-2A order
        want = den_s2_value(S2_L2A_ORDER.index(b), "2018-01")
        assert raw[j].min() == pytest.approx(want, abs=0.05), b
        assert raw[j].max() == pytest.approx(want, abs=0.05), b
    assert _raw(s["s2"][0], "s2_l2a")[0, 0, 0] == pytest.approx(
        den_s2_value(1, "2017-11"), abs=0.05
    )
    # The mask is the majority of each 2 x 2 block of the 8 px class blocks: the same classes,
    # snow & ice (band 7) ignored.
    full = cls(root, "train")[0]["mask"]
    assert torch.equal(s["mask"], full[::2, ::2])
    assert (s["mask"] == 255).any() and set(s["mask"].unique().tolist()) == set(range(6)) | {255}
    # Another band order is a parameter (and is read by it): reversed names swap B2 and B12.
    rev = cls(root, "train", modalities=["s2"], s2_bands=S2_L2A_ORDER[::-1])[0]
    assert rev["s2"].shape == (1, 10, 32, 32)
    assert _raw(rev["s2"][0], "s2_l2a")[0, 0, 0] == pytest.approx(
        den_s2_value(S2_L2A_ORDER[::-1].index("B2"), "2018-01"), abs=0.05
    )
    assert cls(root, "train", modalities=["s2"], grid_factor=4)[0]["mask"].shape == (16, 16)
    png = ds.plot(s, tmp_path / "den_s2.png")
    assert png.stat().st_size > 3000


def test_dynamicearthnet_s1_channels_must_be_named(tmp_path):
    root = fakes.make("dynamicearthnet", tmp_path)
    cls = get_dataset("dynamicearthnet")
    with pytest.raises(
        DatasetError, match="8 Sentinel-1 channels without band descriptions.*s1_bands"
    ):
        cls(root, "val", modalities=["s1"])[0]
    names = ["VH", "VV"] + [f"c{i}" for i in range(6)]  # another order: taken by name
    s = cls(root, "val", modalities=["s1", "s2"], s1_bands=names)[0]
    assert s["s1"].shape == (1, 2, 32, 32) and s["s1_doy"].tolist() == [74]  # 2018-03-15
    raw = _raw(s["s1"][0], "s1_grd_db")
    assert raw[0, 0, 0] == pytest.approx(-17.0, abs=1e-3)  # "VV" = file channel 2
    assert raw[1, 0, 0] == pytest.approx(-13.0, abs=1e-3)  # "VH" = file channel 1 (2018-03)
    with pytest.raises(ValueError, match="names 2 bands, not 8"):
        cls(root, "val", modalities=["s1"], s1_bands=["VV", "VH"])
    (root / "sentinel2" / "1330_3107_13" / "1330_3107_13_2018_03.tif").unlink()
    with pytest.raises(FileNotFoundError, match="no s2 composite of 2018-03"):
        cls(root, "val", modalities=["s2"])


def test_dynamicearthnet_block_majority_takes_the_majority_class_and_ignores_snow():
    """The 7 one-hot label bands coarsened by f: each block gets the class covering most of it,
    255 (ignored) where that is snow & ice (band 7) or where no band is set."""
    from skysense.data.datasets.dynamicearthnet import DEN_CLASSES, block_majority

    k, f = 7, 2
    lab = np.zeros((k, 2, 6), np.uint8)
    lab[1, :, 0:2] = 255  # block 0: agriculture in 4 of 4 pixels
    lab[2, 0, 2:4] = 255  # block 1: forest 3 of 4, water 1 of 4 (a mixed block)
    lab[2, 1, 2] = 255
    lab[5, 1, 3] = 255
    lab[6, :, 4:6] = 255  # block 2: snow & ice 3 of 4, impervious 1 of 4
    lab[6, 1, 5] = 0
    lab[0, 1, 5] = 255
    got = block_majority(lab, f, len(DEN_CLASSES))
    assert got.tolist() == [[1, 2, 255]]
    assert block_majority(np.zeros((k, 2, 2), np.uint8), f, len(DEN_CLASSES)).tolist() == [[255]]

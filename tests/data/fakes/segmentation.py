"""Fakes of the segmentation datasets (layouts in skysense.data.datasets.segmentation / pastis).

- Potsdam: ``2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif`` (uint8 RGB, UTM 33N at 5 cm) and
  ``5_Labels_all/top_potsdam_<a>_<b>_label.tif`` (colour-coded RGB), ``5_Labels_all_noBoundary``
  (black boundaries); tiles 2_10, 2_11 (training) and 2_13 (test), 64 px instead of 6000.
- iSAID: ``{train,val}/images/P<n>.png`` and ``{train,val}/Semantic_masks/images/
  P<n>_instance_color_RGB.png``.
- Sen1Floods11: ``v1.1/data/flood_events/HandLabeled/{S2Hand,S1Hand,LabelHand}/<id>_*.tif``
  (S2 13 float32 bands of digital numbers, S1 VV/VH dB with NaN, labels int16 -1/0/1, EPSG:4326)
  and ``v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv``; 32 px instead of 512.
- PASTIS: ``metadata.geojson`` (EPSG:2154), ``DATA_S2/S2_<id>.npy`` (T, 10, 16, 16) int16,
  ``DATA_S1A/S1A_<id>.npy`` (T, 3, 16, 16) float32 dB, ``ANNOTATIONS/TARGET_<id>.npy``; 16 px
  instead of 128.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from affine import Affine

from fakes.common import smooth_rgb, write_image, write_tif

POTSDAM_COLOURS = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)
ISAID_COLOURS = ((0, 0, 0), (0, 0, 63), (0, 63, 63), (0, 127, 255))  # background, ship, tank, plane


def _blocks(size: int, k: int, n_classes: int) -> np.ndarray:
    """(size, size) class map of 8 px blocks."""
    yy, xx = np.mgrid[0:size, 0:size] // 8
    return ((yy + 2 * xx + k) % n_classes).astype(np.int64)


def make_potsdam(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(5)
    for k, t in enumerate(("2_10", "2_11", "2_13")):
        cls = _blocks(size, k, 6)
        rgb = smooth_rgb(rng, size, 90) // 2 + (cls[..., None] * 20).astype(np.uint8)
        tr = Affine(0.05, 0, 366_000.0 + 10 * k, 0, -0.05, 5_808_000.0)
        write_tif(root / "2_Ortho_RGB" / f"top_potsdam_{t}_RGB.tif", rgb.transpose(2, 0, 1),
                  "EPSG:32633", tr)  # fmt: skip
        lab = np.asarray(POTSDAM_COLOURS, np.uint8)[cls]
        # A few off-palette values, as the distributed labels have at class edges.
        lab[0, :4] = (250, 250, 250)
        write_tif(root / "5_Labels_all" / f"top_potsdam_{t}_label.tif", lab.transpose(2, 0, 1),
                  "EPSG:32633", tr)  # fmt: skip
        eroded = lab.copy()
        eroded[::8] = 0
        write_tif(root / "5_Labels_all_noBoundary" / f"top_potsdam_{t}_label_noBoundary.tif",
                  eroded.transpose(2, 0, 1), "EPSG:32633", tr)  # fmt: skip
    return root


def make_isaid(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(6)
    for k, (split, name) in enumerate((("train", "P0000"), ("train", "P0001"), ("val", "P0002"))):
        cls = _blocks(size, k, len(ISAID_COLOURS))
        write_image(root / split / "images" / f"{name}.png", smooth_rgb(rng, size, 100 + 10 * k))
        lab = np.asarray(ISAID_COLOURS, np.uint8)[cls]
        write_image(
            root / split / "Semantic_masks" / "images" / f"{name}_instance_color_RGB.png", lab
        )
    return root


def make_sen1floods11(root: Path, size: int = 32) -> Path:
    base = root / "v1.1"
    hand = base / "data" / "flood_events" / "HandLabeled"
    yy, xx = np.mgrid[0:size, 0:size]
    splits = {"train": [], "valid": [], "test": []}
    for k, cid in enumerate(("Ghana_103272", "India_1068", "USA_430764", "Bolivia_23014")):
        t = Affine(0.0001, 0, -1.5 + k, 0, -0.0001, 6.0)
        water = (xx + k * 3) < size // 2
        s2 = np.stack([np.where(water, 300, 1500) + 50 * j + 5 * np.sin(yy / 4) for j in range(13)])
        write_tif(hand / "S2Hand" / f"{cid}_S2Hand.tif", s2.astype(np.float32), "EPSG:4326", t)
        s1 = np.stack([np.where(water, -22.0, -9.0), np.where(water, -28.0, -16.0)]).astype(
            np.float32
        )
        s1[:, 0, :3] = np.nan
        write_tif(hand / "S1Hand" / f"{cid}_S1Hand.tif", s1, "EPSG:4326", t)
        lab = water.astype(np.int16)
        lab[-3:, :] = -1
        write_tif(hand / "LabelHand" / f"{cid}_LabelHand.tif", lab, "EPSG:4326", t)
        splits[("train", "train", "valid", "test")[k]].append(
            f"{cid}_S1Hand.tif,{cid}_LabelHand.tif"
        )
    d = base / "splits" / "flood_handlabeled"
    d.mkdir(parents=True, exist_ok=True)
    for s, lines in splits.items():
        (d / f"flood_{s}_data.csv").write_text("\n".join(lines) + "\n")
    return root


def make_pastis(root: Path, size: int = 16) -> Path:
    for d in ("DATA_S2", "DATA_S1A", "DATA_S1D", "ANNOTATIONS"):
        (root / d).mkdir(parents=True, exist_ok=True)
    feats = []
    for k, (pid, fold) in enumerate(((10000, 1), (10001, 2), (10002, 4), (10003, 5))):
        s2_dates = {str(i): d for i, d in enumerate((20180924, 20181014, 20190315)[: 2 + k % 2])}
        s1_dates = {"0": 20180920, "1": 20181110}
        x0, y0 = 650_000.0 + 1280 * k, 6_860_000.0
        feats.append({
            "type": "Feature",
            "properties": {"ID_PATCH": pid, "Fold": fold, "dates-S2": s2_dates,
                           "dates-S1A": s1_dates, "dates-S1D": s1_dates},
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + 1280, y0],
                         [x0 + 1280, y0 - 1280], [x0, y0 - 1280], [x0, y0]]]},
        })  # fmt: skip
        sem = _blocks(size, k, 19)
        sem[0, :4] = 19  # void label
        s2 = np.stack([
            np.stack([np.full((size, size), 400 + 100 * b + 200 * t) + 10 * (sem % 5) for b in range(10)])
            for t in range(len(s2_dates))
        ]).astype(np.int16)  # fmt: skip
        np.save(root / "DATA_S2" / f"S2_{pid}.npy", s2)
        s1 = np.stack([np.stack([np.full((size, size), -10.0 - t), np.full((size, size), -17.0),
                                 np.full((size, size), 7.0)]) for t in range(2)]).astype(np.float32)  # fmt: skip
        for orbit in ("S1A", "S1D"):
            np.save(root / f"DATA_{orbit}" / f"{orbit}_{pid}.npy", s1)
        np.save(
            root / "ANNOTATIONS" / f"TARGET_{pid}.npy", np.stack([sem, sem, sem]).astype(np.uint8)
        )
    geo = {"type": "FeatureCollection",
           "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}},
           "features": feats}  # fmt: skip
    (root / "metadata.geojson").write_text(json.dumps(geo))
    return root


def make_hls_burn_scars(root: Path, size: int = 32) -> Path:
    """HLS Burn Scars: ``{training,validation}/subsetted_512x512_HLS.S30.<tile>.<YYYYDDD>.v1.4
    _merged.tif`` (6 float32 reflectance bands B02 B03 B04 B8A B11 B12, UTM) and ``.mask.tif``
    (int16 1 / 0 / -1); band j holds ``0.01 * (j + 1)`` outside the scar; 32 px instead of 512."""
    yy, xx = np.mgrid[0:size, 0:size]
    chips = (("training", "T10SEH", "2018190"), ("training", "T11SKA", "2019245"),
             ("validation", "T12TUN", "2020200"))  # fmt: skip
    for k, (folder, tile, date) in enumerate(chips):
        scar = (xx - 16) ** 2 + (yy - 16 - k) ** 2 < 64
        bands = np.stack([np.where(scar, 0.2, 0.01 * (j + 1)) for j in range(6)]).astype(np.float32)
        t = Affine(30.0, 0, 500_000.0 + 1e4 * k, 0, -30.0, 4_200_000.0)
        stem = f"subsetted_512x512_HLS.S30.{tile}.{date}.v1.4"
        write_tif(root / folder / f"{stem}_merged.tif", bands, "EPSG:32610", t)
        mask = scar.astype(np.int16)
        mask[:2] = -1
        write_tif(root / folder / f"{stem}.mask.tif", mask, "EPSG:32610", t)
    return root


MADOS_WAVELENGTHS = {  # nm -> (resolution folder, the band it is)
    442: (60, "B1"), 492: (10, "B2"), 559: (10, "B3"), 665: (10, "B4"), 704: (20, "B5"),
    739: (20, "B6"), 780: (20, "B7"), 833: (10, "B8"), 864: (20, "B8A"), 1610: (20, "B11"),
    2186: (20, "B12"),
}  # fmt: skip


def mados_value(band: str) -> float:
    """Reflectance the fake MADOS writes for ``band`` (away from the NaN corner)."""
    return 0.01 * (list(b for _, b in MADOS_WAVELENGTHS.values()).index(band) + 1)


def make_mados(root: Path, size: int = 36) -> Path:
    """MADOS: ``Scene_<k>/{10,20,60}/Scene_<k>_L2R_rhorc_<nm>_<crop>.tif`` (float32 reflectance,
    NaN corner), ``Scene_<k>/10/Scene_<k>_L2R_cl_<crop>.tif`` (uint8 0 unlabelled, 1..15) and
    ``splits/{train,val,test}_X.txt``; Scene_1 carries Sentinel-2B wavelengths (1614, 2202 nm);
    36 px instead of 240."""
    for scene, crops in (("Scene_0", (1, 2)), ("Scene_1", (1,))):
        for crop in crops:
            for nm, (res, band) in MADOS_WAVELENGTHS.items():
                nm_file = {1610: 1614, 2186: 2202}.get(nm, nm) if scene == "Scene_1" else nm
                n = size * 10 // res
                a = np.full((n, n), mados_value(band), np.float32)
                a[0, 0] = np.nan
                t = Affine(res, 0, 200_000.0, 0, -res, 4_500_000.0)
                write_tif(root / scene / str(res) / f"{scene}_L2R_rhorc_{nm_file}_{crop}.tif", a,
                          "EPSG:32634", t)  # fmt: skip
            cl = np.zeros((size, size), np.uint8)
            cl[4:12, 4:20] = 7  # Marine Water
            cl[20:24, 10:14] = 1  # Marine Debris
            t = Affine(10, 0, 200_000.0, 0, -10, 4_500_000.0)
            write_tif(root / scene / "10" / f"{scene}_L2R_cl_{crop}.tif", cl, "EPSG:32634", t)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for s, names in (
        ("train", "Scene_0_1\nScene_1_1"),
        ("val", "Scene_0_2"),
        ("test", "Scene_0_2"),
    ):
        (root / "splits" / f"{s}_X.txt").write_text(names + "\n")
    return root


DEN_S2_MONTHS = ("2017-11", "2018-01", "2018-02", "2018-03", "2018-04")


def den_s2_value(band_index: int, ym: str) -> float:
    """Digital number the fake DynamicEarthNet S2 composite of ``ym`` holds in file band
    ``band_index`` (0-based, file order = the Level-2A order)."""
    return 1000.0 + 100.0 * band_index + 10.0 * DEN_S2_MONTHS.index(ym)


def make_dynamicearthnet(root: Path, size: int = 64) -> Path:
    """DynamicEarthNet as the mediaTUM archives and the authors' split lists lay it out:
    ``planet/<zone>/<aoi>/<cube>/PF-SR/<YYYY-MM-DD>.tif`` (4 uint16 bands B G R NIR, UTM 3 m;
    B = 500, G = 1000, R = 1500 + class pattern), ``labels/<cube>_<zone>/Labels/Raster/<id>/
    <id>-<YYYY>_<MM>_01.tif`` (7 uint8 bands, 255 where the class is; some snow & ice),
    ``sentinel2/<cube>/<cube>_<YYYY>_<MM>.tif`` (12 uint16 bands, no descriptions, 10 m over a
    little more than the cube; band j = ``den_s2_value(j, month)``; none for 2017-12),
    ``sentinel1/<cube>/<cube>_<YYYY>_<MM>.tif`` (8 float32 dB channels, no descriptions:
    VV = -10 - index in DEN_S2_MONTHS, VH = -17, the others -5) and ``dynnet_training_splits/
    {train,val,test}.txt`` (planet dirs written as the authors do, /reprocess-cropped/
    UTM-24000/...); 64 px instead of 1024."""
    cube, zone, lid = "1330_3107_13", "10N", "10N-122W-40N-L3H-SR"
    authors = f"/reprocess-cropped/UTM-24000/{zone}/27E-188N/{cube}/PF-SR"
    planet = root / "planet" / zone / "27E-188N" / cube / "PF-SR"
    lines = {"train": [], "val": [], "test": []}
    t = Affine(3.0, 0, 550_000.0, 0, -3.0, 4_400_000.0)
    t10 = Affine(10.0, 0, 550_000.0 - 4.0, 0, -10.0, 4_400_000.0 + 4.0)
    s10 = int(np.ceil(size * 3 / 10)) + 1
    for j, ym in enumerate(DEN_S2_MONTHS):
        y, m = ym.split("-")
        s2 = np.stack([np.full((s10, s10), den_s2_value(b, ym)) for b in range(12)])
        write_tif(root / "sentinel2" / cube / f"{cube}_{y}_{m}.tif", s2.astype(np.uint16),
                  "EPSG:32610", t10)  # fmt: skip
        s1 = np.full((8, s10, s10), -5.0, np.float32)
        s1[0], s1[1] = -10.0 - j, -17.0
        write_tif(root / "sentinel1" / cube / f"{cube}_{y}_{m}.tif", s1, "EPSG:32610", t10)
    for k, ym in enumerate(("2018-01", "2018-02", "2018-03", "2018-04")):
        cls = _blocks(size, k, 7)
        img = np.stack([np.full((size, size), 500), np.full((size, size), 1000),
                        1500 + 100 * cls, np.full((size, size), 3000)]).astype(np.uint16)  # fmt: skip
        for day in ("01", "05"):
            write_tif(planet / f"{ym}-{day}.tif", img, "EPSG:32610", t)
        y, m = ym.split("-")
        lab_rel = f"/labels/{cube}_{zone}/Labels/Raster/{lid}/{lid}-{y}_{m}_01.tif"
        onehot = np.stack([(cls == c) * 255 for c in range(7)]).astype(np.uint8)
        write_tif(root / lab_rel.lstrip("/"), onehot, "EPSG:32610", t)
        lines[("train", "train", "val", "test")[k]].append(f"{authors} {lab_rel} {ym}")
    d = root / "dynnet_training_splits"
    d.mkdir(parents=True, exist_ok=True)
    for s, ls in lines.items():
        (d / f"{s}.txt").write_text("\n".join(ls) + "\n")
    return root

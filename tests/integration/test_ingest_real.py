"""Ingest of the real samples in ../shared/data: BigEarthNet (per-band S2 at 10/20/60 m + S1),
OSCD (per-band S2 L1C, two dates, EPSG:4326), a Sentinel-1 scene, HR RGB (EPSG:3857 and UTM).
CRS handling is checked by the centre lat/lon, resampling by the band shapes, and the shards by
a round trip against the sources read on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine

from skysense.data import build_loader, io
from skysense.data.batch import validate_batch
from skysense.data.geo import Grid
from skysense.data.ingest import IngestConfig, ingest
from skysense.data.manifest import Manifest
from skysense.data.shards import CLEAR, HAS_DATA, ShardReader

pytestmark = pytest.mark.integration


def _place_grid(m: Manifest, sid: int) -> tuple[Grid, int, int]:
    """The grid of the place a sample was cut from, and the sample's (row, col) in it.

    A warp between CRSs depends slightly on the window GDAL is asked for (its approximate
    transformer interpolates along each output row, within 1/8 pixel), so sources are re-read
    the way ingest reads them: whole rows of the place's grid.
    """
    grp, row, col = m.query("SELECT grp, row, col FROM samples WHERE id=?", (sid,))[0]
    crs, transform, h, w = m.query(
        "SELECT crs, transform, height, width FROM groups WHERE grp=?", (grp,)
    )[0]
    grid = Grid(rasterio.crs.CRS.from_string(crs), Affine(*json.loads(transform)), h, w)
    return grid, row, col


@pytest.fixture(scope="module")
def bigearthnet(shared_data, tmp_path_factory):
    rep = ingest(
        shared_data / "bigearthnet",
        tmp_path_factory.mktemp("ben"),
        IngestConfig(tile_size=120),
        progress=False,
    )
    assert rep.ok, rep.format()
    return Manifest(rep.manifest)


def test_bigearthnet_per_band_s2_and_s1(bigearthnet, shared_data):
    m = bigearthnet
    assert len(m) == 6 and m.modalities == ("s2", "s1")
    assert m.label_kind == "multi" and "Non-irrigated arable land" in m.classes
    reader = ShardReader(m)
    s2_root = shared_data / "bigearthnet" / "BigEarthNet-S2-Example"
    s1_root = shared_data / "bigearthnet" / "BigEarthNet-S1-Example"
    for sid, grp, shard, off, lat, lon, s2_dates, s1_dates, labels in m.query(
        "SELECT id, grp, shard, offset, lat, lon, s2_dates, s1_dates, labels FROM samples"
    ):
        a = reader.arrays(shard)
        # every band at 10 m: 120 x 120, the 20 m (60 x 60) and 60 m (20 x 20) ones resampled
        assert a["s2"].shape[2:] == (120, 120, 10) and a["s1"].shape[2:] == (120, 120, 2)
        patch = s2_root / grp
        meta = json.loads(next(patch.glob("*_labels_metadata.json")).read_text())
        assert sorted(m.classes[i] for i in json.loads(labels)) == sorted(meta["labels"])
        assert s2_dates == meta["acquisition_date"][:10]
        # the S1 patch paired through its metadata, with its own date
        s1_patch = next(
            p
            for p in s1_root.iterdir()
            if json.loads(next(p.glob("*_labels_metadata.json")).read_text())[
                "corresponding_s2_patch"
            ]
            == grp
        )
        s1_meta = json.loads(next(s1_patch.glob("*_labels_metadata.json")).read_text())
        assert s1_dates == s1_meta["acquisition_time"][:10]
        # round trip: shard pixels == the sources read on their own onto the place's grid
        grid, row, col = _place_grid(m, sid)
        assert (row, col) == (0, 0) and grid.shape == (120, 120)
        ref, prof = io.read_band_folder(patch, grid=grid)
        np.testing.assert_array_equal(
            a["s2"][off, 0], np.clip(np.rint(np.moveaxis(ref, 0, -1)), 0, 65535).astype(np.uint16)
        )
        ref1, _ = io.read_band_folder(s1_patch, sensor="s1_grd_db", grid=grid)
        np.testing.assert_array_equal(a["s1"][off, 0], np.moveaxis(ref1, 0, -1))
        # centre lat/lon from the patch's UTM bounds
        c = meta["coordinates"]
        clon, clat = rasterio.warp.transform(
            prof["crs"], "EPSG:4326", [(c["ulx"] + c["lrx"]) / 2], [(c["uly"] + c["lry"]) / 2]
        )
        assert lat == pytest.approx(clat[0], abs=1e-6) and lon == pytest.approx(clon[0], abs=1e-6)


def test_oscd_rennes_epsg4326_two_dates(shared_data, tmp_path):
    rep = ingest(
        shared_data / "oscd" / "images" / "rennes", tmp_path, IngestConfig(), progress=False
    )
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    ((crs, h, w),) = m.query("SELECT crs, height, width FROM groups")
    # EPSG:4326 sources reprojected to UTM 30N at 10 m: ~4.8 x 4.3 km
    assert crs == "EPSG:32630" and 420 < h < 460 and 460 < w < 500
    lat, lon = m.samples.latlon.mean(0)
    assert abs(lat - 48.11) < 0.02 and abs(lon + 1.65) < 0.02  # Rennes: 48.1 N, 1.7 W
    # dates from dates.txt (the file names of imgs_1 carry a processing date, not this one)
    assert {r[0] for r in m.query("SELECT s2_dates FROM samples")} == {"2015-08-21,2017-06-21"}
    assert {r[0] for r in m.query("SELECT sensor FROM acquisitions")} == {"s2_l1c"}
    reader = ShardReader(m)
    grid = None
    for sid, shard, off in m.query("SELECT id, shard, offset FROM samples WHERE row > 100 LIMIT 3"):
        grid, row, col = _place_grid(m, sid)
        for step, folder in enumerate(("imgs_1", "imgs_2")):
            ref, _ = io.read_band_folder(
                shared_data / "oscd" / "images" / "rennes" / folder, sensor="s2_l1c", grid=grid
            )
            ref = ref[:, row : row + 64, col : col + 64]
            np.testing.assert_array_equal(
                reader.arrays(shard)["s2"][off, step],
                np.clip(np.rint(np.nan_to_num(np.moveaxis(ref, 0, -1))), 0, 65535).astype(
                    np.uint16
                ),
            )
    b = next(iter(build_loader(m, None, 4, "torch", views=True, view_config={"crop": 48})))
    validate_batch(b, views=True)


def test_sentinel1_single_pol_scene(shared_data, tmp_path):
    src = shared_data / "sentinel1"
    rep = ingest(src, tmp_path, IngestConfig(missing_bands="fill"), progress=False)
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    ((crs, h, w),) = m.query("SELECT crs, height, width FROM groups")
    assert crs == "EPSG:32631" and (h, w) == (434, 536)  # 217 x 268 at 20 m -> 10 m
    assert {r[0] for r in m.query("SELECT s1_dates FROM samples")} == {"2015-03-09"}
    lat, lon = m.samples.latlon.mean(0)
    with rasterio.open(next(src.glob("*.tif"))) as ds:
        b = ds.bounds
        clon, clat = rasterio.warp.transform(
            ds.crs, "EPSG:4326", [(b.left + b.right) / 2], [(b.top + b.bottom) / 2]
        )
        raw = ds.read(1)
    assert abs(lat - clat[0]) < 0.01 and abs(lon - clon[0]) < 0.01
    # the scene's nodata (-99) is masked, the rest is valid dB
    reader = ShardReader(m)
    masks = np.concatenate([reader.arrays(s)["s1_mask"][:, 0] for s in m.shards])
    data = np.concatenate([reader.arrays(s)["s1"][:, 0] for s in m.shards])
    has = (masks & HAS_DATA) > 0
    # pixels outside the scene (the 64 px tiles overhang its edges) or at its nodata (-99)
    assert has.mean() > 0.5 and ((~has).any() or not (raw == -99).any())
    assert np.isnan(data[..., 0][~has]).all() and np.isfinite(data[..., 0][has]).all()
    assert -40 < np.nanmedian(data[..., 0]) < 5
    assert (masks[has] & CLEAR).all()


@pytest.mark.parametrize(
    "name, lat, lon",
    [("usgs_rsvqa_hr", 40.8, -74.0), ("OSBS_029.tif", 29.68, -81.99)],
)
def test_hr_rgb_web_mercator_and_utm(shared_data, tmp_path, name, lat, lon):
    src = shared_data / "hr_rgb" / name
    rep = ingest(src, tmp_path, IngestConfig(hr_tile_size=128), progress=False)
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    assert m.modalities == ("hr",) and m.meta["hr_only"]
    crs = {r[0] for r in m.query("SELECT crs FROM groups")}
    assert crs == ({"EPSG:32618"} if name.startswith("usgs") else {"EPSG:32617"})
    la, lo = m.samples.latlon.mean(0)
    assert abs(la - lat) < 0.15 and abs(lo - lon) < 0.15
    if name.endswith(".tif"):
        # UTM at 0.1 m kept as it is: 400 px -> 4 tiles of 128 px spread over it
        reader = ShardReader(m)
        hr = reader.arrays(0)["hr"]
        assert m.meta["gsd"] == 0.1 and len(m) == 16 and hr.shape[1:] == (128, 128, 3)
        with rasterio.open(src) as ds:
            ref = ds.read(window=rasterio.windows.Window(0, 0, 128, 128))
            nodata = ds.nodata
        # the file declares 255 as nodata: those pixels are masked and stored as 0
        ref = np.moveaxis(ref, 0, -1)
        has = (ref != nodata).all(-1)
        np.testing.assert_array_equal(hr[0], np.where(has[..., None], ref, 0))
        np.testing.assert_array_equal(reader.arrays(0)["hr_mask"][0] > 0, has)
    else:
        assert m.query("SELECT COUNT(DISTINCT grp) FROM samples")[0][0] == 12  # 12 places
    b = next(iter(build_loader(m, None, 2, "torch")))
    validate_batch(b)
    assert set(b) >= {"hr", "hr_pixel_valid", "latlon"} and "s2" not in b


def test_skysense_ingest_command_on_oscd_and_bigearthnet(shared_data, tmp_path, capsys):
    from skysense.tasks import cli

    for src, extra in (("oscd/images", ["workers=2"]), ("bigearthnet", [])):
        dst = tmp_path / src.replace("/", "_")
        assert cli.main(["ingest", str(shared_data / src), str(dst), *extra]) == 0
        out = capsys.readouterr().out
        assert "bad files: none" in out
        m = Manifest(dst)
        assert len(m) > 0 and list((dst / "shards").glob("shard-*/s2.npy"))
        pngs = sorted((dst / "plots").glob("sample_*.png"))
        assert len(pngs) == 2 and all(p.stat().st_size > 10_000 for p in pngs)
    assert len(Manifest(tmp_path / "oscd_images")) > 500  # 10 cities of 64 px tiles

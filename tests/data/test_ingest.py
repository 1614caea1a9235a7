"""Ingest on GeoTIFFs made here: CRS handling, resampling, round trip through shards, masks,
every bad-input case, resuming after an interruption (also a real SIGKILL)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform

from skysense.data import io
from skysense.data.geo import Grid
from skysense.data.ingest import IngestConfig, ingest
from skysense.data.manifest import Manifest, ManifestError
from skysense.data.sensors import S2_MODEL_BANDS, SENSORS
from skysense.data.shards import CLEAR, HAS_DATA, ShardReader

pytestmark = pytest.mark.unit

UTM = "EPSG:32631"
X0, Y0 = 440_000.0, 4_850_000.0  # about 43.8 N, 2.26 E


def _s2_per_band(folder: Path, date: dt.date, n10: int = 48, value=None, nodata_left: int = 0):
    """Per-band S2 L2A files at native 10/20/60 m; band b's value = 100 * (b + 1) + ramp."""
    spec = SENSORS["s2_l2a"]
    truth = {}
    for k, band in enumerate(spec.bands):
        gsd = spec.native_gsd(band)
        n = int(n10 * 10 / gsd)
        ramp = np.arange(n)[None, :] * 1.5 * (gsd / 10)  # 1.5 DN per 10 m, whatever the GSD
        a = (100 * (k + 1) + ramp + np.zeros((n, 1))).astype(np.uint16)
        if value is not None:
            a[:] = value
        if nodata_left:
            a[:, : int(nodata_left * 10 / gsd)] = 0
        truth[band] = a
        name = f"T31TDJ_{date:%Y%m%d}T103021_{band if len(band) == 3 else 'B0' + band[1:]}.tif"
        io.write_geotiff(folder / name, a, crs=UTM, transform=Affine(gsd, 0, X0, 0, -gsd, Y0))
    return truth


def _lonlat_grid(n: int, crs: str, bounds):
    """Pixel-centre (lon, lat) of an n x n grid covering ``bounds`` in ``crs``."""
    left, bottom, right, top = bounds
    xs = left + (np.arange(n) + 0.5) * (right - left) / n
    ys = top - (np.arange(n) + 0.5) * (top - bottom) / n
    X, Y = np.meshgrid(xs, ys)
    lon, lat = warp_transform(crs, "EPSG:4326", X.ravel(), Y.ravel())
    return np.array(lon).reshape(n, n), np.array(lat).reshape(n, n)


def _field(lon, lat):
    """A smooth function of position (the same ground gives the same value in any CRS)."""
    return 1000.0 * (lat - 43.8) + 700.0 * (lon - 2.2)


def _cross_crs_place(src: Path):
    """S2 per-band in UTM 31N, S1 in EPSG:4326, HR in Web Mercator, all over the same ground."""
    place = src / "field_a"
    _s2_per_band(place / "s2" / "20210405", dt.date(2021, 4, 5))
    _s2_per_band(place / "s2" / "20210610", dt.date(2021, 6, 10))
    # The S2 footprint (480 m) in lon/lat, padded by ~100 m, for S1 and HR.
    b = rasterio.warp.transform_bounds(UTM, "EPSG:4326", X0, Y0 - 480, X0 + 480, Y0)
    pad = 0.0015
    b4326 = (b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad)
    n1 = 80
    lon, lat = _lonlat_grid(n1, "EPSG:4326", b4326)
    vv = (-10.0 + _field(lon, lat) / 100.0).astype(np.float32)
    s1 = np.stack([vv, vv - 7.0])
    t4326 = Affine(
        (b4326[2] - b4326[0]) / n1, 0, b4326[0], 0, -(b4326[3] - b4326[1]) / n1, b4326[3]
    )
    io.write_geotiff(
        place / "s1" / "S1A_IW_GRDH_20210501_db.tif",
        s1,
        crs="EPSG:4326",
        transform=t4326,
        band_names=["VV", "VH"],
    )
    b3857 = rasterio.warp.transform_bounds("EPSG:4326", "EPSG:3857", *b4326)
    nh = 600
    lon, lat = _lonlat_grid(nh, "EPSG:3857", b3857)
    r = np.clip(128 + _field(lon, lat) / 4.0, 0, 255)
    hr = np.stack([r, np.full_like(r, 90), np.full_like(r, 60)]).astype(np.uint8)
    t3857 = Affine(
        (b3857[2] - b3857[0]) / nh, 0, b3857[0], 0, -(b3857[3] - b3857[1]) / nh, b3857[3]
    )
    io.write_geotiff(
        place / "hr" / "ortho.tif",
        hr,
        crs="EPSG:3857",
        transform=t3857,
        tags={"ACQUISITION_DATE": "2021-05-20"},
    )
    return place


def test_ingest_aligns_sensors_across_crs_and_round_trips(tmp_path):
    src = tmp_path / "src"
    _cross_crs_place(src)
    rep = ingest(
        src, tmp_path / "dst", IngestConfig(tile_size=24, hr_ratio=4, shard_size=3), progress=False
    )
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    assert len(m) == 4 and m.modalities == ("hr", "s2", "s1") and m.label_kind == "none"
    ((grp, crs, transform, h, w, ratio),) = m.query(
        "SELECT grp, crs, transform, height, width, hr_ratio FROM groups"
    )
    assert grp == "field_a" and crs == "EPSG:32631" and (h, w, ratio) == (48, 48, 4)
    reader = ShardReader(m)
    rows = m.query(
        "SELECT id, shard, offset, row, col, lat, lon, minx, maxy, s2_dates, s2_valid, hr_dates FROM samples"
    )
    assert len({r[1] for r in rows}) == 2  # shard_size 3 -> two shards of 2
    for _, shard, off, row, col, lat, lon, minx, maxy, s2_dates, s2_valid, hr_dates in rows:
        assert s2_dates == "2021-04-05,2021-06-10" and s2_valid == "11" and hr_dates == "2021-05-20"
        assert minx == X0 + 10 * col and maxy == Y0 - 10 * row
        # centre lat/lon from the UTM grid
        clon, clat = warp_transform(UTM, "EPSG:4326", [minx + 120], [maxy - 120])
        assert lat == pytest.approx(clat[0], abs=1e-9) and lon == pytest.approx(clon[0], abs=1e-9)
        a = reader.arrays(shard)
        tile = Grid(rasterio.crs.CRS.from_string(UTM), Affine(10, 0, minx, 0, -10, maxy), 24, 24)
        # round trip: the stored S2 pixels are the sources warped onto the tile grid
        for step, date in enumerate(("20210405", "20210610")):
            ref, _ = io.read_band_folder(src / "field_a" / "s2" / date, grid=tile)
            np.testing.assert_array_equal(
                a["s2"][off, step], np.rint(np.moveaxis(ref, 0, -1)).astype(np.uint16)
            )
            assert (a["s2_mask"][off, step] == HAS_DATA | CLEAR).all()
        # 20 m band B5 (index 3) resampled bilinearly to 10 m: 24 distinct values along a row
        # (nearest neighbour would repeat each 20 m value twice), climbing 1.5 DN per pixel
        b5 = a["s2"][off, 0, :, :, 3].astype(float)
        assert all(len(np.unique(r)) >= 22 for r in b5)
        assert np.abs(np.diff(b5[:, 1:-1], axis=1) - 1.5).max() <= 0.51
        # S1 (EPSG:4326) and HR (EPSG:3857) carry a function of lon/lat: after reprojection the
        # value at each tile pixel is that function at the pixel's own lon/lat
        lon_t, lat_t = _lonlat_grid(24, UTM, tile.bounds)
        np.testing.assert_allclose(
            a["s1"][off, 0, :, :, 0], -10 + _field(lon_t, lat_t) / 100, atol=0.03
        )
        lon_h, lat_h = _lonlat_grid(96, UTM, tile.bounds)
        hr_r = a["hr"][off][:, :, 0].astype(float)
        assert np.abs(hr_r - np.clip(128 + _field(lon_h, lat_h) / 4, 0, 255)).max() <= 1.5
    stats = m.band_stats[("s2", "B2")]
    assert stats["count"] == 4 * 2 * 24 * 24 and stats["min"] >= 200


def _bad_inputs(src: Path) -> dict[str, str]:
    """A folder of good and bad files; returns {file name: expected reason fragment}."""
    t = Affine(10, 0, X0, 0, -10, Y0)
    good = src / "good"
    _s2_per_band(good / "20210405", dt.date(2021, 4, 5), n10=24)
    stack = np.full((10, 24, 24), 800, np.uint16)
    io.write_geotiff(
        good / "S2B_MSIL2A_20210808.tif",
        stack,
        crs=UTM,
        transform=t,
        band_names=list(S2_MODEL_BANDS),
    )
    expect = {}
    (src / "good" / "junk_20210101.tif").write_bytes(b"II*\x00 this is no tiff")
    expect["junk_20210101.tif"] = "unreadable"
    big = io.write_geotiff(
        src / "trunc" / "S2A_MSIL2A_20210102.tif",
        np.random.default_rng(0).integers(1, 9000, (10, 300, 300)).astype(np.uint16),
        crs=UTM,
        transform=t,
    )
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 3])
    expect["S2A_MSIL2A_20210102.tif"] = "truncated"
    io.write_geotiff(
        src / "five" / "S2A_MSIL2A_20210103.tif",
        np.ones((5, 24, 24), np.uint16),
        crs=UTM,
        transform=t,
    )
    expect["S2A_MSIL2A_20210103.tif"] = "5 bands do not match sensor s2_l2a"
    io.write_geotiff(
        src / "u8" / "S2A_MSIL2A_20210104.tif",
        np.ones((10, 24, 24), np.uint8),
        crs=UTM,
        transform=t,
    )
    expect["S2A_MSIL2A_20210104.tif"] = "dtype uint8 does not match sensor s2_l2a"
    (src / "nocrs").mkdir(parents=True)
    with rasterio.open(
        src / "nocrs" / "S2A_MSIL2A_20210105.tif",
        "w",
        driver="GTiff",
        height=24,
        width=24,
        count=10,
        dtype="uint16",
    ) as ds:
        ds.write(np.ones((10, 24, 24), np.uint16))
    expect["S2A_MSIL2A_20210105.tif"] = "no CRS"
    far = Affine(10, 0, X0 + 50_000, 0, -10, Y0)
    io.write_geotiff(
        src / "apart" / "S2A_MSIL2A_20210106.tif",
        stack,
        crs=UTM,
        transform=t,
        band_names=list(S2_MODEL_BANDS),
    )
    io.write_geotiff(
        src / "apart" / "S1A_IW_GRDH_20210106_db.tif",
        np.zeros((2, 24, 24), np.float32),
        crs=UTM,
        transform=far,
        band_names=["VV", "VH"],
    )
    expect["S1A_IW_GRDH_20210106_db.tif"] = "no overlap between sensors"
    io.write_geotiff(
        src / "empty" / "S2A_MSIL2A_20210107.tif",
        np.zeros((10, 24, 24), np.uint16),
        crs=UTM,
        transform=t,
        nodata=0,
    )
    expect["S2A_MSIL2A_20210107.tif"] = "entirely nodata"
    # An undated single image is a valid place of unknown date (tests/data/test_undated.py).
    io.write_geotiff(src / "nodate" / "S2A_MSIL2A_scene.tif", stack, crs=UTM, transform=t)
    io.write_geotiff(src / "baddate" / "S2A_MSIL2A_20211345.tif", stack, crs=UTM, transform=t)
    expect["S2A_MSIL2A_20211345.tif"] = "unparseable date"
    return expect


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_every_bad_input_is_reported_and_the_good_ones_finish(tmp_path, capsys):
    src = tmp_path / "src"
    expect = _bad_inputs(src)
    rep = ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    reasons = {Path(p).name: r for p, r in rep.bad_files}
    for name, fragment in expect.items():
        assert name in reasons, f"{name} not reported; report:\n{rep.format()}"
        assert fragment in reasons[name], (name, reasons[name])
    assert not rep.ok
    m = Manifest(rep.manifest)
    groups = {r[0] for r in m.query("SELECT DISTINCT grp FROM samples")}
    assert groups == {"good", "apart", "nodate"}  # apart's S2 is fine; its far S1 is reported
    (dates,) = m.query("SELECT s2_dates FROM samples WHERE grp='good'")[0]
    assert dates == "2021-04-05,2021-08-08"  # per-band set and stack of one place
    assert {Path(p).name for p, _ in m.bad_files} >= set(expect)
    # The command prints the per-file report and says so in its return code.
    from skysense.tasks import cli

    rc = cli.main(["ingest", str(src), str(tmp_path / "dst2"), "tile_size=24", "plots=1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "bad files (" in out and "S2A_MSIL2A_20210103.tif: 5 bands do not match" in out
    assert (tmp_path / "dst2" / "plots").is_dir()
    assert cli.main(["ingest", str(src), str(tmp_path / "dst3"), "no_such_field=1"]) == 2


def _write_places(src: Path, n: int):
    t = Affine(10, 0, X0, 0, -10, Y0)
    for i in range(n):
        a = np.full((10, 24, 24), 500 + i, np.uint16)
        tt = t @ Affine.translation(0, 100 * i)
        io.write_geotiff(
            src / f"p{i:02d}" / "S2A_MSIL2A_20210301.tif",
            a,
            crs=UTM,
            transform=tt,
            band_names=list(S2_MODEL_BANDS),
        )
        io.write_geotiff(
            src / f"p{i:02d}" / "S2A_MSIL2A_20210401.tif",
            a + 1,
            crs=UTM,
            transform=tt,
            band_names=list(S2_MODEL_BANDS),
        )


def _content(manifest: Path):
    m = Manifest(manifest)
    r = ShardReader(m)
    rows = m.query("SELECT name, split, lat, lon, s2_dates FROM samples ORDER BY id")
    pix = [np.asarray(r.arrays(s)["s2"][o]) for s, o in zip(m.samples.shard, m.samples.offset)]
    return rows, pix


def test_resume_after_an_interruption(tmp_path):
    src = tmp_path / "src"
    _write_places(src, 6)
    cfg = IngestConfig(tile_size=24, shard_size=2)
    fresh = ingest(src, tmp_path / "fresh", cfg, progress=False)

    def boom(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "dst", cfg, progress=False, on_shard=boom)
    with pytest.raises(ManifestError, match="did not finish"):
        Manifest(tmp_path / "dst")
    rep = ingest(src, tmp_path / "dst", cfg, progress=False)
    assert rep.resumed and rep.n_places_skipped == 4 and rep.n_samples == 6
    a, b = _content(fresh.manifest), _content(rep.manifest)
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)
    # a complete manifest is left alone; other settings are refused
    again = ingest(src, tmp_path / "dst", cfg, progress=False)
    assert again.resumed and again.n_samples == 6
    with pytest.raises(ValueError, match="other settings"):
        ingest(src, tmp_path / "dst", IngestConfig(tile_size=12, shard_size=2), progress=False)


def test_killed_ingest_leaves_no_half_shard(tmp_path):
    src = tmp_path / "src"
    _write_places(src, 8)
    dst = tmp_path / "dst"
    script = textwrap.dedent(
        f"""
        import time
        from skysense.data.ingest import IngestConfig, ingest
        ingest({str(src)!r}, {str(dst)!r}, IngestConfig(tile_size=24, shard_size=1),
               progress=False, on_shard=lambda i: time.sleep(0.3))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if len(list((dst / "shards").glob("shard-*"))) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    for d in (dst / "shards").iterdir():
        # every folder without .tmp is a whole shard
        if not d.name.endswith(".tmp"):
            assert (d / "shard.json").is_file(), d
    with pytest.raises(ManifestError, match="did not finish"):
        Manifest(dst)
    rep = ingest(src, dst, IngestConfig(tile_size=24, shard_size=1), progress=False)
    assert rep.n_samples == 8 and rep.resumed
    assert not list((dst / "shards").glob("*.tmp"))
    fresh = ingest(
        src, tmp_path / "fresh", IngestConfig(tile_size=24, shard_size=1), progress=False
    )
    a, b = _content(fresh.manifest), _content(rep.manifest)
    assert a[0] == b[0]


def test_cloud_masks_and_step_usability(tmp_path):
    src = tmp_path / "src"
    t = Affine(10, 0, X0, 0, -10, Y0)
    a = np.full((10, 24, 24), 900, np.uint16)
    for d in ("20210301", "20210401", "20210501"):
        io.write_geotiff(
            src / "p" / f"S2A_MSIL2A_{d}.tif",
            a,
            crs=UTM,
            transform=t,
            band_names=list(S2_MODEL_BANDS),
        )
    cloud = np.zeros((24, 24), np.uint8)
    cloud[:6] = 1  # a quarter cloudy
    io.write_geotiff(src / "p" / "S2A_MSIL2A_20210301_CLM.tif", cloud, crs=UTM, transform=t)
    io.write_geotiff(
        src / "p" / "S2A_MSIL2A_20210401_CLM.tif", np.ones((24, 24), np.uint8), crs=UTM, transform=t
    )
    scl = np.full((12, 12), 4, np.uint8)  # vegetation
    scl[:, :3] = 9  # cloud high probability
    scl[-3:] = 0  # no data
    io.write_geotiff(
        src / "p" / "S2A_MSIL2A_20210501_SCL.tif",
        scl,
        crs=UTM,
        transform=Affine(20, 0, X0, 0, -20, Y0),
    )
    rep = ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    mask = ShardReader(m).arrays(0)["s2_mask"][0]
    assert (mask[0, :6] == HAS_DATA).all() and (mask[0, 6:] == HAS_DATA | CLEAR).all()
    assert (mask[1] == HAS_DATA).all()  # all cloud: has data, not clear
    assert (mask[2, :-6, :6] == HAS_DATA).all() and (mask[2, -6:] == 0).all()
    assert m.query("SELECT s2_valid FROM samples")[0][0] == "101"  # the all-cloud step is unusable


def test_linear_sar_single_pol_and_hr_only(tmp_path):
    src = tmp_path / "src"
    t = Affine(20, 0, X0, 0, -20, Y0)
    lin = np.full((12, 12), 0.1, np.float32)
    lin[0, 0] = -99.0
    io.write_geotiff(
        src / "s1" / "S1A_IW_20210301_VV_linear.tif", lin, crs=UTM, transform=t, nodata=-99.0
    )
    with pytest.raises(io.BadInputError, match=r"no usable place.*lacks band\(s\) VH"):
        ingest(src / "s1", tmp_path / "a", IngestConfig(tile_size=24), progress=False)
    rep = ingest(
        src / "s1", tmp_path / "b", IngestConfig(tile_size=24, missing_bands="fill"), progress=False
    )
    assert rep.ok, rep.format()
    s1 = ShardReader(Manifest(rep.manifest)).arrays(0)["s1"][0, 0]
    assert s1.shape == (24, 24, 2)  # 20 m -> 10 m
    np.testing.assert_allclose(s1[2:, 2:, 0], -10.0, atol=1e-5)  # 0.1 linear = -10 dB
    np.testing.assert_allclose(s1[2:, 2:, 1], SENSORS["s1_grd_db"].mean[1])  # VH filled
    assert np.isnan(s1[0, 0, 0])  # nodata (the -99 corner) stays no data
    # HR only, in Web Mercator: tiles in HR pixels, lat/lon of the place
    x, y = rasterio.warp.transform("EPSG:4326", "EPSG:3857", [-74.0], [40.7])
    th = Affine(0.25, 0, x[0], 0, -0.25, y[0])
    io.write_geotiff(
        src / "hr" / "tile.tif",
        np.full((3, 400, 400), 120, np.uint8),
        crs="EPSG:3857",
        transform=th,
    )
    rep = ingest(src / "hr", tmp_path / "c", IngestConfig(hr_tile_size=128), progress=False)
    assert rep.ok, rep.format()
    m = Manifest(rep.manifest)
    assert m.modalities == ("hr",) and m.meta["hr_only"] and m.meta["hr_ratio"] == 1
    assert ShardReader(m).arrays(0)["hr"].shape[1:] == (128, 128, 3)
    lat, lon = m.samples.latlon.mean(0)
    assert abs(lat - 40.7) < 0.01 and abs(lon + 74.0) < 0.01


def test_a_registered_sensor_is_ingested_and_normalised_with_its_statistics(tmp_path):
    from skysense.data import build_loader
    from skysense.data.sensors import SensorSpec, register_sensor

    spec = SensorSpec(
        name="test_bgrn",
        modality="hr",
        bands=("B", "G", "R", "N"),  # blue first, plus near infrared: not the RGB order
        wavelengths_nm=(485, 545, 630, 820),
        gsd=(0.5,) * 4,
        dtype="uint8",
        model_bands=("R", "G", "B"),
        mean=(100.0, 110.0, 120.0),
        std=(50.0, 55.0, 60.0),
    )
    register_sensor(spec)
    try:
        a = np.stack([np.full((64, 64), v, np.uint8) for v in (10, 20, 30, 40)])
        t = Affine(0.5, 0, X0, 0, -0.5, Y0)
        io.write_geotiff(tmp_path / "src" / "scene_bgrn.tif", a, crs=UTM, transform=t)
        cfg = IngestConfig(hr_tile_size=32, sensors={"bgrn": "test_bgrn"})
        rep = ingest(tmp_path / "src", tmp_path / "dst", cfg, progress=False)
        assert rep.ok, rep.format()
        m = Manifest(rep.manifest)
        assert m.meta["normalization"]["hr"]["sensors"] == ["test_bgrn"]
        hr = next(iter(build_loader(m, None, 1, "torch")))["hr"][0]
        # R, G, B = bands 3, 2, 1 of the file, normalised with the sensor's own statistics
        np.testing.assert_allclose(
            hr[:, 0, 0].numpy(), [(30 - 100) / 50, (20 - 110) / 55, (10 - 120) / 60], rtol=1e-6
        )
        bad = SensorSpec(
            "test_two_band_s2",
            "s2",
            ("B4", "B8"),
            (665.0, 833.0),
            (10.0, 10.0),
            "uint16",
            ("B4", "B8"),
            (1.0, 1.0),
            (1.0, 1.0),
        )
        register_sensor(bad)
        io.write_geotiff(
            tmp_path / "src2" / "x_20210101_two.tif",
            np.ones((2, 24, 24), np.uint16),
            crs=UTM,
            transform=Affine(10, 0, X0, 0, -10, Y0),
        )
        with pytest.raises(ValueError, match="takes 10 of uint16"):
            ingest(
                tmp_path / "src2",
                tmp_path / "dst2",
                IngestConfig(tile_size=24, sensors={"two": "test_two_band_s2"}),
                progress=False,
            )
    finally:
        SENSORS.pop("test_bgrn", None)
        SENSORS.pop("test_two_band_s2", None)

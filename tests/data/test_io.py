"""skysense.data.io, sensors, dates: reading GeoTIFFs as they come, on files made here."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio
from affine import Affine

from skysense.data import io
from skysense.data.dates import DateError, day_of_year, parse_date, to_days
from skysense.data.geo import Grid, choose_crs, utm_crs
from skysense.data.sensors import SENSORS, SensorSpec, get_sensor, register_sensor

pytestmark = pytest.mark.unit

UTM31 = "EPSG:32631"


def _s2_band_folder(folder, rng, *, x0=500000.0, y0=5000000.0, size=60, name="T31TCJ_20210614"):
    """Per-band S2 files at native resolution (10/20/60 m), as distributed."""
    spec = SENSORS["s2_l2a"]
    truth = {}
    for b in spec.bands:
        gsd = spec.native_gsd(b)
        n = int(size * 10 / gsd)
        a = rng.integers(1, 5000, (n, n)).astype(np.uint16)
        truth[b] = a
        io.write_geotiff(
            folder / f"{name}_{b if len(b) == 3 else 'B0' + b[1:]}.tif",
            a,
            crs=UTM31,
            transform=Affine(gsd, 0, x0, 0, -gsd, y0),
        )
    return truth


def test_sensor_registry():
    s2 = SENSORS["s2_l2a"]
    assert s2.model_bands == ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
    assert len(SENSORS["s2_l1c"].bands) == 13 and "B10" in SENSORS["s2_l1c"].bands
    assert "B10" not in s2.bands and len(s2.bands) == 12
    assert s2.mean[0] == pytest.approx(884.3) and s2.std[-1] == pytest.approx(1343.5)
    assert SENSORS["s1_grd_db"].mean == (-12.548, -20.192)
    assert SENSORS["hr_rgb"].mean == (123.675, 116.28, 103.53)
    assert s2.native_gsd("B8A") == 20.0 and s2.native_gsd("B1") == 60.0
    assert s2.canonical_band("B08") == "B8" and s2.canonical_band("b8a") == "B8A"
    assert s2.canonical_band("B10") is None  # L2A has no B10
    assert [s2.bands[i] for i in s2.model_index] == list(s2.model_bands)
    # linear power -> dB
    lin = SENSORS["s1_grd_linear"]
    np.testing.assert_allclose(lin.to_model_units(np.array([1.0, 0.1, 0.01])), [0, -10, -20])
    with pytest.raises(KeyError, match="unknown sensor 'nope'"):
        get_sensor("nope")


def test_register_sensor():
    spec = SensorSpec(
        name="test_rgbn",
        modality="hr",
        bands=("R", "G", "B", "N"),
        wavelengths_nm=(660, 545, 480, 830),
        gsd=(0.5,) * 4,
        dtype="uint16",
        model_bands=("R", "G", "B"),
        mean=(1.0, 1.0, 1.0),
        std=(2.0, 2.0, 2.0),
    )
    try:
        register_sensor(spec)
        assert SENSORS["test_rgbn"] is spec
        with pytest.raises(ValueError, match="already registered"):
            register_sensor(spec)
        register_sensor(spec, overwrite=True)
    finally:
        SENSORS.pop("test_rgbn", None)
    with pytest.raises(ValueError, match="model bands"):
        SensorSpec("x", "s2", ("B1",), (1.0,), (10.0,), "uint16", ("B2",), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="std must be positive"):
        SensorSpec("x", "s2", ("B1",), (1.0,), (10.0,), "uint16", ("B1",), (0.0,), (0.0,))


def test_parse_date():
    assert parse_date("S2A_MSIL2A_20170613T101031_87_48") == dt.date(2017, 6, 13)
    assert parse_date("scene_2021-03-04.tif") == dt.date(2021, 3, 4)
    # a tile number glued to digits is not a date
    assert parse_date("T31TCJ_120201301_20200102.tif") == dt.date(2020, 1, 2)
    assert parse_date("img_04.03.2021.tif", r"(?P<day>\d\d)\.(?P<month>\d\d)\.(?P<year>\d{4})") == (
        dt.date(2021, 3, 4)
    )
    assert parse_date("x_2021_063.tif", "%Y_%j") == dt.date(2021, 3, 4)
    with pytest.raises(DateError, match="no date found"):
        parse_date("no_date_here.tif")
    with pytest.raises(DateError, match="not a valid date"):
        parse_date("S2A_20171345.tif", r"(?P<date>\d{8})")
    days = np.array([to_days(dt.date(2020, 1, 1)), to_days(dt.date(2020, 12, 31))])
    np.testing.assert_array_equal(day_of_year(days), [1, 366])


def test_read_date_sources(tmp_path):
    p = io.write_geotiff(
        tmp_path / "a" / "scene.tif",
        np.ones((4, 4), np.uint16),
        crs=UTM31,
        transform=Affine(10, 0, 0, 0, -10, 0),
        tags={"ACQUISITION_DATE": "2019-07-01"},
    )
    assert io.read_date(p) == dt.date(2019, 7, 1)
    q = io.write_geotiff(
        tmp_path / "20180302" / "scene.tif",
        np.ones((4, 4), np.uint16),
        crs=UTM31,
        transform=Affine(10, 0, 0, 0, -10, 0),
    )
    assert io.read_date(q) == dt.date(2018, 3, 2)  # from the parent folder's name
    # OSCD-style sidecar: imgs_2 <- dates.txt date_2
    r = io.write_geotiff(
        tmp_path / "city" / "imgs_2" / "X_20990101_B02.tif",
        np.ones((4, 4), np.uint16),
        crs=UTM31,
        transform=Affine(10, 0, 0, 0, -10, 0),
    )
    (tmp_path / "city" / "dates.txt").write_text("date_1: 20150821\ndate_2: 20170621\n")
    assert io.read_date(r) == dt.date(2017, 6, 21)
    # a user pattern wins over everything
    assert io.read_date(r, r"X_(?P<date>\d{8})") == dt.date(2099, 1, 1)
    with pytest.raises(DateError, match="no date matching"):
        io.read_date(r, r"Y_(?P<date>\d{8})")


def test_read_band_folder_resamples_to_10m(tmp_path):
    rng = np.random.default_rng(0)
    truth = _s2_band_folder(tmp_path, rng)
    arr, prof = io.read_band_folder(tmp_path, resampling="nearest")
    assert arr.shape == (10, 60, 60) and arr.dtype == np.float32
    assert prof["bands"] == list(SENSORS["s2_l2a"].model_bands)
    assert Grid(prof["crs"], prof["transform"], 60, 60).res == (10.0, 10.0)
    assert prof["date"] == dt.date(2021, 6, 14)
    np.testing.assert_array_equal(arr[0], truth["B2"])  # native 10 m: exact
    # 20 m band, nearest: each 20 m pixel covers 2 x 2 10 m pixels
    np.testing.assert_array_equal(arr[3], np.kron(truth["B5"], np.ones((2, 2))))
    arr_b, _ = io.read_band_folder(tmp_path, ["B02", "B11"], resampling="bilinear")
    assert arr_b.shape == (2, 60, 60)
    # bilinear stays within the range of the 20 m values and keeps the mean
    assert abs(np.nanmean(arr_b[1]) - truth["B11"].mean()) < 0.02 * truth["B11"].mean()


def test_read_band_folder_nodata_and_reflectance_scale(tmp_path):
    a = np.full((20, 20), 1234, np.uint16)
    a[:5] = 0  # Sentinel-2's nodata, undeclared
    for b in ("B02", "B03"):
        io.write_geotiff(
            tmp_path / f"x_20200101_{b}.tif", a, crs=UTM31, transform=Affine(10, 0, 0, 0, -10, 0)
        )
    arr, _ = io.read_band_folder(tmp_path, ["B2", "B3"])
    assert np.isnan(arr[:, :5]).all() and (arr[:, 5:] == 1234).all()
    # float reflectance with a declared scale -> digital numbers
    r = io.write_geotiff(
        tmp_path / "refl" / "r_20200101.tif",
        np.full((10, 8, 8), 1234, np.uint16).astype(np.float32),
        crs=UTM31,
        transform=Affine(10, 0, 0, 0, -10, 0),
        scales=[1e-4] * 10,
    )
    arr2, prof = io.read_stack(r)
    np.testing.assert_allclose(arr2, 1234.0, rtol=1e-5)
    assert prof["bands"] == list(SENSORS["s2_l2a"].model_bands)


def test_read_band_folder_keeps_geographic_grid(tmp_path):
    # OSCD distributes EPSG:4326 per-band files: the 10 m band's grid is kept as it is
    t10 = Affine(0.0001, 0, -1.7, 0, -0.0001, 48.1)
    t20 = Affine(0.0002, 0, -1.7, 0, -0.0002, 48.1)
    io.write_geotiff(
        tmp_path / "c_B02.tif", np.ones((40, 60), np.uint16), crs="EPSG:4326", transform=t10
    )
    io.write_geotiff(
        tmp_path / "c_B05.tif", np.ones((20, 30), np.uint16), crs="EPSG:4326", transform=t20
    )
    arr, prof = io.read_band_folder(tmp_path, ["B2", "B5"], date_pattern=None)
    assert arr.shape == (2, 40, 60) and prof["crs"] == rasterio.crs.CRS.from_epsg(4326)
    assert prof["date"] is None


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_read_stack_band_names_and_errors(tmp_path):
    t = Affine(1, 0, 0, 0, -1, 0)
    rgb = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
    p = io.write_geotiff(
        tmp_path / "rgb.tif", rgb[::-1], crs=UTM31, transform=t, band_names=["blue", "green", "red"]
    )
    arr, prof = io.read_stack(p, sensor="hr_rgb")
    assert prof["bands"] == ["R", "G", "B"]
    np.testing.assert_array_equal(arr, rgb.astype(np.float32))  # reordered by description
    bad = io.write_geotiff(
        tmp_path / "five.tif", np.zeros((5, 16, 16), np.uint16), crs=UTM31, transform=t
    )
    with pytest.raises(io.BadInputError, match="5 bands do not match sensor s2_l2a"):
        io.read_stack(bad)
    u8 = io.write_geotiff(
        tmp_path / "u8.tif", np.zeros((10, 16, 16), np.uint8), crs=UTM31, transform=t
    )
    with pytest.raises(io.BadInputError, match="dtype uint8 does not match sensor s2_l2a"):
        io.read_stack(u8)
    with rasterio.open(
        tmp_path / "nocrs.tif", "w", driver="GTiff", height=8, width=8, count=1, dtype="uint8"
    ) as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(io.BadInputError, match="no CRS"):
        io.read_stack(tmp_path / "nocrs.tif", sensor="hr_rgb")
    big = io.write_geotiff(tmp_path / "big.tif", rng_image(), crs=UTM31, transform=t)
    data = big.read_bytes()
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.BadInputError, match="unreadable"):
        io.read_stack(trunc, sensor="hr_rgb")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(io.BadInputError, match="unreadable"):
        io.read_stack(tmp_path / "junk.tif", sensor="hr_rgb")


def rng_image():
    return np.random.default_rng(1).integers(0, 255, (3, 128, 128)).astype(np.uint8)


def test_find_band_files(tmp_path):
    t = Affine(10, 0, 0, 0, -10, 0)
    for name in ("S1A_IW_20150309_VV_grd_db.tif", "S1A_IW_20150309_VH_grd_db.tif", "notes.txt"):
        if name.endswith(".tif"):
            io.write_geotiff(tmp_path / name, np.zeros((4, 4), np.float32), crs=UTM31, transform=t)
        else:
            (tmp_path / name).write_text("x")
    files = io.find_band_files(tmp_path, "s1_grd_db")
    assert list(files) == ["VV", "VH"]
    assert io.band_of_file("T30UWU_20170621T110651_B8A.tif", "s2_l1c") == "B8A"
    assert io.band_of_file("a_B_c.tif", "hr_rgb") is None  # a stray B is not blue
    with pytest.raises(io.BadInputError, match="no file for band B2"):
        io.find_band_files(tmp_path, "s2_l2a", ["B2"])


def test_grid_and_crs():
    assert utm_crs(-1.68, 48.1).to_epsg() == 32630
    assert utm_crs(151.2, -33.9).to_epsg() == 32756
    g = Grid.from_bounds((500003.0, 4999000.0, 500643.0, 5000004.0), UTM31, 10.0)
    assert g.transform.c == 500000.0 and g.transform.f == 5000000.0 and g.shape == (100, 64)
    lat, lon = g.centre_latlon()
    assert 45.0 < lat < 45.2 and 2.9 < lon < 3.1
    assert choose_crs(UTM31, g.bounds).to_epsg() == 32631  # UTM kept
    assert choose_crs("EPSG:4326", (-1.7, 48.0, -1.6, 48.1)).to_epsg() == 32630
    assert (
        choose_crs("EPSG:3857", (-8237237.0, 4977235.0, -8237134.0, 4977338.0)).to_epsg() == 32618
    )
    h = g.scaled(8)
    assert h.shape == (800, 512) and h.res == (1.25, 1.25) and h.bounds == g.bounds

"""STAC input (issue 20): a static catalogue, an ItemCollection and a STAC GeoParquet file
over local COGs ingest to the same samples as the folder of those COGs, and load.

The COGs are made from two shared OSCD cities (Sentinel-2 L1C per-band files, EPSG:4326) or,
where ../shared/data is absent, from small generated UTM GeoTIFFs of the same profile."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine

from skysense.data import build_loader
from skysense.data.batch import validate_batch
from skysense.data.ingest import ingest
from skysense.data.manifest import Manifest
from skysense.data.shards import sample_checksums

pystac = pytest.importorskip("pystac", reason="pystac is not installed (skysense-data[scale])")

from tests.conftest import shared_data_dir  # noqa: E402

# model bands of Sentinel-2 with their STAC common names
BANDS = {
    "B02": "blue",
    "B03": "green",
    "B04": "red",
    "B05": "rededge071",
    "B06": "rededge075",
    "B07": "rededge078",
    "B08": "nir",
    "B8A": "nir08",
    "B11": "swir16",
    "B12": "swir22",
}


def _generated(folder):
    """Two places x two dates of 10 per-band uint16 files (10 m and 20 m bands), UTM 31N."""
    rng = np.random.default_rng(0)
    out = []
    for place, x0 in (("alpha", 500_000.0), ("beta", 520_000.0)):
        for date in ("20200105", "20200310"):
            d = folder / place / date
            d.mkdir(parents=True)
            files = {}
            for b in BANDS:
                res = 20.0 if b in ("B05", "B06", "B07", "B8A", "B11", "B12") else 10.0
                n = int(800 / res)
                p = d / f"S2_{place}_{date}_{b}.tif"
                with rasterio.open(
                    p,
                    "w",
                    driver="GTiff",
                    width=n,
                    height=n,
                    count=1,
                    dtype="uint16",
                    crs="EPSG:32631",
                    transform=Affine(res, 0, x0, 0, -res, 5_000_000.0),
                    nodata=0,
                ) as ds:
                    ds.write(rng.integers(1, 4000, (1, n, n), dtype=np.uint16))
                files[b] = p
            out.append((place, dt.date(int(date[:4]), int(date[4:6]), int(date[6:])), files))
    return out


def _oscd(src, folder):
    out = []
    for city in ("norcia", "bercy"):  # the two smallest cities
        lines = (src / city / "dates.txt").read_text().splitlines()
        dates = dict(ln.split(": ") for ln in lines if ": " in ln)
        for k, sub in (("date_1", "imgs_1"), ("date_2", "imgs_2")):
            date = dates[k].strip()
            d = folder / city / date
            d.mkdir(parents=True)
            files = {}
            for b in BANDS:
                # named by the acquisition date (OSCD's names carry the processing date)
                files[b] = d / f"S2_{city}_{date}_{b}.tif"
            out.append((city, dt.date(int(date[:4]), int(date[4:6]), int(date[6:])), files))
            for b, f in files.items():
                orig = next((src / city / sub).glob(f"*_{b}.tif"))
                rasterio.shutil.copy(orig, f, driver="COG")
    return out


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    """(folder of COGs, [(place, date, {band: path})])."""
    folder = tmp_path_factory.mktemp("cogs")
    src = shared_data_dir() / "oscd" / "images"
    scenes = _oscd(src, folder) if src.is_dir() else _generated(folder)
    for _, _, files in scenes:
        for f in files.values():
            with rasterio.open(f) as ds:
                assert ds.crs is not None
    return folder, scenes


def _items(scenes):
    items = []
    for place, date, files in scenes:
        with rasterio.open(files["B02"]) as ds:
            b = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        geom = {
            "type": "Polygon",
            "coordinates": [[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]],
        }
        item = pystac.Item(
            id=f"{place}_{date:%Y%m%d}",
            geometry=geom,
            bbox=list(b),
            datetime=dt.datetime(date.year, date.month, date.day, 10, 30, tzinfo=dt.timezone.utc),
            properties={"platform": "sentinel-2a", "processing:level": "L1C"},
            collection=None,
        )
        for band, common in BANDS.items():
            item.add_asset(
                common,
                pystac.Asset(
                    href=str(files[band]),
                    media_type=pystac.MediaType.COG,
                    roles=["data"],
                    extra_fields={"eo:bands": [{"name": band, "common_name": common}]},
                ),
            )
        item.add_asset("thumbnail", pystac.Asset(href="thumb.png", roles=["thumbnail"]))
        items.append(item)
    return items


def _summary(dst):
    """Per sample, sorted by place centre: lat, lon, dates, validity and array checksums."""
    rows = sample_checksums(Manifest(dst))
    return sorted((r[6], r[7], r[12], r[13], tuple(sorted(s.items()))) for r, s in rows)


def test_static_catalogue_itemcollection_and_geoparquet_ingest_like_the_folder(cogs, tmp_path):
    folder, scenes = cogs
    cfg = {"s2_default": "s2_l1c", "progress": False}
    ref = ingest(folder, tmp_path / "folder", **cfg)
    assert ref.ok, ref.format()
    want = _summary(tmp_path / "folder")
    assert len(want) > 0

    # a static, self-contained catalogue with relative hrefs written beside it
    cat = pystac.Catalog(id="skysense-test", description="COGs of shared samples")
    items = _items(scenes)
    cat.add_items(items)
    cat.normalize_hrefs(str(tmp_path / "catalog"))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    catalog = tmp_path / "catalog" / "catalog.json"
    rep = ingest(catalog, tmp_path / "from_catalog", **cfg)
    assert rep.ok, rep.format()
    assert rep.n_places == len({p for p, _, _ in scenes})
    assert _summary(tmp_path / "from_catalog") == want
    m = Manifest(tmp_path / "from_catalog")
    sensors = {r[0] for r in m.query("SELECT DISTINCT sensor FROM acquisitions")}
    assert sensors == {"s2_l1c"}  # from processing:level
    dates = sorted({r[0] for r in m.query("SELECT s2_dates FROM samples")})
    assert all(d.count(",") == 1 for d in dates)  # two dated steps per sample

    # an ItemCollection with absolute hrefs
    ic = pystac.ItemCollection(_items(scenes))
    ic.save_object(dest_href=str(tmp_path / "items.json"))
    rep = ingest(tmp_path / "items.json", tmp_path / "from_items", **cfg)
    assert rep.ok and _summary(tmp_path / "from_items") == want

    # STAC GeoParquet: one row per item, assets as a struct column
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for it in _items(scenes):
        d = it.to_dict()
        rows.append(
            {
                "id": d["id"],
                "collection": "sentinel-2-l1c",
                "datetime": it.datetime,
                "platform": "sentinel-2a",
                "assets": {
                    k: {"href": a["href"], "eo:bands": a.get("eo:bands")}
                    for k, a in d["assets"].items()
                    if k != "thumbnail"
                },
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "items.parquet")
    rep = ingest(tmp_path / "items.parquet", tmp_path / "from_parquet", **cfg)
    assert rep.ok and _summary(tmp_path / "from_parquet") == want

    batch = next(iter(build_loader(tmp_path / "from_catalog", None, 2, "torch")))
    validate_batch(batch)
    assert batch["s2"].shape[1:3] == (2, 10) and batch["s2_valid"].any()


def test_a_missing_asset_is_a_bad_file_and_the_rest_ingest(cogs, tmp_path):
    _, scenes = cogs
    items = _items(scenes)
    items[0].assets["blue"].href = str(tmp_path / "gone.tif")
    ic = pystac.ItemCollection(items)
    ic.save_object(dest_href=str(tmp_path / "items.json"))
    rep = ingest(tmp_path / "items.json", tmp_path / "dst", progress=False)
    assert any("gone.tif" in p for p, _ in rep.bad_files)
    assert rep.n_samples > 0


def test_remote_hrefs_go_through_gdal_virtual_file_systems(tmp_path):
    from pathlib import Path

    from skysense.data.stac import _gdal_path

    url = "https://example.com/tiles/S2_B02.tif?sig=a/b"
    p = _gdal_path(url, str(tmp_path))
    assert p.startswith("/vsicurl?url=https%3A%2F%2Fexample.com") and str(Path(p)) == p
    assert _gdal_path("s3://bucket/k/B02.tif", "/x") == "/vsis3/bucket/k/B02.tif"
    assert _gdal_path("B02.tif", str(tmp_path)) == str(tmp_path / "B02.tif")


def test_hr_visual_and_sentinel1_assets(tmp_path):
    """An aerial RGB item (one "visual" asset with red/green/blue eo:bands), a Sentinel-1 item
    (vv, vh assets) and a Sentinel-2 item over one place give one place of all three sensors,
    each dated by its item."""
    from skysense.data.io import write_geotiff

    rng = np.random.default_rng(1)
    x0, y0 = 500_000.0, 5_000_000.0
    t10 = Affine(10.0, 0, x0, 0, -10.0, y0)
    files = {}
    for b in BANDS:
        files[b] = write_geotiff(
            tmp_path / "s2" / f"{b}.tif",
            rng.integers(1, 4000, (1, 64, 64), dtype=np.uint16),
            crs="EPSG:32631",
            transform=t10,
            nodata=0,
        )
    for pol in ("VV", "VH"):
        files[pol] = write_geotiff(
            tmp_path / "s1" / f"{pol}.tif",
            rng.normal(-15, 3, (1, 64, 64)).astype(np.float32),
            crs="EPSG:32631",
            transform=t10,
        )
    files["rgb"] = write_geotiff(
        tmp_path / "hr" / "ortho.tif",
        rng.integers(0, 255, (3, 640, 640), dtype=np.uint8),
        crs="EPSG:32631",
        transform=Affine(1.0, 0, x0, 0, -1.0, y0),
    )
    geom = {"type": "Point", "coordinates": [3.0, 45.1]}

    def item(i, when, props, assets):
        it = pystac.Item(i, geom, [3.0, 45.1, 3.0, 45.1], when, props)
        for k, (path, bands) in assets.items():
            it.add_asset(
                k, pystac.Asset(str(path), roles=["data"], extra_fields={"eo:bands": bands})
            )
        return it

    utc = dt.timezone.utc
    items = [
        item(
            "s2",
            dt.datetime(2021, 6, 3, 10, tzinfo=utc),
            {"platform": "sentinel-2b"},
            {c: (files[b], [{"name": b, "common_name": c}]) for b, c in BANDS.items()},
        ),
        item(
            "s1",
            dt.datetime(2021, 6, 5, 23, 50, tzinfo=utc),
            {"platform": "sentinel-1a"},
            {"vv": (files["VV"], None), "vh": (files["VH"], None)},
        ),
        item(
            "aerial",
            dt.datetime(2021, 7, 1, tzinfo=utc),
            {"platform": "aircraft"},
            {
                "visual": (
                    files["rgb"],
                    [{"common_name": "red"}, {"common_name": "green"}, {"common_name": "blue"}],
                )
            },
        ),
    ]
    pystac.ItemCollection(items).save_object(dest_href=str(tmp_path / "items.json"))
    rep = ingest(tmp_path / "items.json", tmp_path / "dst", progress=False, tile_size=32)
    assert rep.ok, rep.format()
    m = Manifest(tmp_path / "dst")
    assert m.modalities == ("hr", "s2", "s1") and rep.n_places == 1 and len(m) == 4
    dates = set(m.query("SELECT hr_dates, s2_dates, s1_dates FROM samples"))
    assert dates == {("2021-07-01", "2021-06-03", "2021-06-05")}
    b = next(iter(build_loader(m, None, 2, "torch")))
    validate_batch(b)
    assert b["hr"].shape[-2:] == (320, 320)  # hr_ratio 10 from the 1 m ortho

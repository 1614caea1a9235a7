"""Ingest guards: memory bounded by blocks (and the same result), sparse files, resuming a place
cut across shards, the DST lock, another source (append, overwrite), confined shard paths,
damaged manifests, a full disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from test_ingest import UTM, X0, Y0, _content, _cross_crs_place, _write_places

from skysense.data import io
from skysense.data.ingest import IngestConfig, ingest
from skysense.data.manifest import Manifest, ManifestError
from skysense.data.sensors import S2_MODEL_BANDS
from skysense.data.shards import ShardReader

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------- memory bounded by blocks


def test_tile_blocks_stay_within_the_budget_whatever_the_place():
    from skysense.data.ingest import tile_blocks
    from skysense.data.ingest_align import _starts

    for n, ratio, budget in ((2000, 1, 1 << 16), (32000, 1, 1 << 21), (700, 4, 1 << 18)):
        rows = cols = _starts(n, 64)
        blocks = tile_blocks(rows, cols, 64, ratio, budget)
        seen = []
        for brows, bcols in blocks:
            h = brows[-1] + 64 - brows[0]
            w = bcols[-1] + 64 - bcols[0]
            # within budget, or a single tile when one tile alone exceeds it
            assert h * w * ratio**2 <= max(budget, 64 * 64 * ratio**2), (n, h, w)
            seen += [(r, c) for r in brows for c in bcols]
        assert sorted(seen) == sorted((r, c) for r in rows for c in cols)  # each tile once


def test_small_blocks_give_the_same_shards_as_one_block(tmp_path):
    """Blocks of a few tiles (rows and columns, some tiles overlapping) and the spill file
    give exactly the pixels, masks and rows of one whole-place block."""
    src = tmp_path / "src"
    _cross_crs_place(src)  # S2 per band in UTM, S1 in EPSG:4326, HR in Web Mercator
    kw = dict(tile_size=20, hr_ratio=2, shard_size=3)
    one = ingest(src, tmp_path / "one", IngestConfig(**kw, block_pixels=1 << 24), progress=False)
    small = ingest(src, tmp_path / "small", IngestConfig(**kw, block_pixels=1), progress=False)
    assert one.ok and small.ok and one.n_samples == small.n_samples == 9
    a, b = Manifest(one.manifest), Manifest(small.manifest)
    q = "SELECT name, lat, lon, s2_dates, s2_valid, s1_valid, hr_dates FROM samples ORDER BY id"
    assert a.query(q) == b.query(q)
    ra, rb = ShardReader(a), ShardReader(b)
    for s in a.shards:
        for k, v in ra.arrays(s).items():
            if v.dtype.kind == "f":
                # S1 is reprojected from EPSG:4326: GDAL's approximate transformer places a
                # pixel to within float rounding of where a whole-place warp puts it.
                np.testing.assert_allclose(v, rb.arrays(s)[k], rtol=1e-6, err_msg=k)
            else:
                np.testing.assert_array_equal(v, rb.arrays(s)[k], err_msg=k)
    assert not (tmp_path / "small" / ".spill").exists()


def test_a_place_cut_across_shards_resumes_to_the_same_result(tmp_path):
    src = tmp_path / "src"
    _write_places(src, 1)  # one place of 24 x 24 px: 16 tiles of 6
    cfg = IngestConfig(tile_size=6, shard_size=5)
    fresh = ingest(src, tmp_path / "fresh", cfg, progress=False)
    assert fresh.n_samples == 16 and fresh.n_shards == 4

    def boom(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "dst", cfg, progress=False, on_shard=boom)
    m = Manifest(tmp_path / "dst", require_complete=False)
    assert len(m) == 10 and m.query("SELECT COUNT(*) FROM groups") == [(0,)]  # place half done
    rep = ingest(src, tmp_path / "dst", cfg, progress=False)
    assert rep.resumed and rep.n_samples == 16
    a, b = _content(fresh.manifest), _content(rep.manifest)
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


# -------------------------------------------------------------- the destination and the manifest


def test_a_second_ingest_into_a_locked_dst_stops_naming_the_holder(tmp_path):
    from skysense.data.ingest import IngestLockedError
    from skysense.data.ingest_write import DstLock

    src = tmp_path / "src"
    _write_places(src, 1)
    with DstLock(tmp_path / "dst"):
        with pytest.raises(IngestLockedError, match=f"pid {os.getpid()}") as e:
            ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
        assert e.value.filename == str(tmp_path / "dst" / ".ingest.lock")
    assert ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False).ok


def test_another_source_is_refused_unless_append_or_overwrite(tmp_path):
    from skysense.data.ingest import IngestConflictError

    a, b = tmp_path / "a", tmp_path / "b"
    _write_places(a, 2)
    io.write_geotiff(
        b / "q00" / "S2A_MSIL2A_20210301.tif",
        np.full((10, 24, 24), 900, np.uint16),
        crs=UTM,
        transform=Affine(10, 0, X0 + 5000, 0, -10, Y0),
        band_names=list(S2_MODEL_BANDS),
    )
    cfg = IngestConfig(tile_size=24)
    ingest(a, tmp_path / "dst", cfg, progress=False)
    with pytest.raises(IngestConflictError, match="mode=append") as e:
        ingest(b, tmp_path / "dst", cfg, progress=False)
    assert e.value.field == "src" and str(tmp_path / "dst" / "manifest.sqlite") in str(e.value)
    rep = ingest(b, tmp_path / "dst", cfg, mode="append", progress=False)
    assert rep.n_samples == 3 and rep.n_places == 1
    m = Manifest(rep.manifest)
    assert m.meta["sources"] == [str(a.resolve()), str(b.resolve())]
    assert len(m.band_stats) == 10 and m.band_stats[("s2", "B2")]["max"] == 900
    rep = ingest(b, tmp_path / "dst", cfg, overwrite=True, progress=False)
    assert rep.n_samples == 1 and Manifest(rep.manifest).meta["sources"] == [str(b.resolve())]


@pytest.mark.parametrize("path", ["../outside/shard-000000", "/etc", "shards/../../x", "."])
def test_a_shard_path_outside_the_manifest_folder_is_refused(tmp_path, path):
    import sqlite3

    src = tmp_path / "src"
    _write_places(src, 1)
    rep = ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    db = sqlite3.connect(rep.manifest)
    with db:
        db.execute("UPDATE shards SET path=? WHERE id=0", (path,))
    db.close()
    with pytest.raises(ManifestError, match="outside the manifest's folder") as e:
        Manifest(rep.manifest)
    assert str(rep.manifest) in str(e.value) and repr(path) in str(e.value)


def test_enospc_in_a_shard_names_the_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    from skysense.data import shards

    src = tmp_path / "src"
    _write_places(src, 2)
    orig = np.save

    def save(f, a, *args, **kw):
        if getattr(f, "name", "").endswith("s2_mask.npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(f, a, *args, **kw)

    monkeypatch.setattr(shards.np, "save", save)
    with pytest.raises(OSError, match="No space left") as e:
        ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    assert e.value.filename.endswith("shard-000000.tmp/s2_mask.npy")
    assert (
        not list((tmp_path / "dst").rglob("*.tmp")) and not (tmp_path / "dst" / ".spill").exists()
    )


def test_a_damaged_manifest_is_a_manifest_error_naming_it(tmp_path):
    src = tmp_path / "src"
    _write_places(src, 1)
    rep = ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    data = rep.manifest.read_bytes()
    rep.manifest.write_bytes(data[:2048])  # cut short: its pages are gone
    with pytest.raises(ManifestError, match="not a readable manifest") as e:
        Manifest(rep.manifest)
    assert str(rep.manifest) in str(e.value)


def _sparse_s1(path: Path, n: int = 2048) -> None:
    """A sparse tiled S1 stack (blocks of 256, nodata NaN): two data squares, the rest absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff", width=n, height=n, count=2, dtype="float32", crs="EPSG:32633",
        transform=Affine(10, 0, 404_400.0, 0, -10, 5_342_400.0), nodata=float("nan"),
        tiled=True, blockxsize=256, blockysize=256, SPARSE_OK=True,
    )  # fmt: skip
    a = np.linspace(-12, -8, 300 * 300, dtype=np.float32).reshape(300, 300)
    with rasterio.open(path, "w", **profile) as ds:
        ds.set_band_description(1, "VV")
        ds.set_band_description(2, "VH")
        ds.update_tags(ACQUISITION_DATE="2017-06-13")
        for r, c in ((300, 700), (1500, 200)):  # not on block edges
            ds.write(np.stack([a, a - 7]), window=rasterio.windows.Window(c, r, 300, 300))


@pytest.mark.parametrize("crs", ["auto", "EPSG:32632"])  # aligned reads; reprojected warps
def test_absent_blocks_of_a_sparse_file_are_skipped_with_the_same_result(
    tmp_path, monkeypatch, crs
):
    src = tmp_path / "src"
    _sparse_s1(src / "place" / "S1A_IW_GRDH_20170613_db.tif")
    cfg = IngestConfig(tile_size=32, crs=crs, block_pixels=1 << 16)
    calls = []
    orig = io._absent

    def counting(*a, **k):
        calls.append(orig(*a, **k))
        return calls[-1]

    monkeypatch.setattr(io, "_absent", counting)
    fast = ingest(src, tmp_path / "fast", cfg, progress=False)
    assert any(calls) and not all(calls)  # empty blocks skipped, the data read
    monkeypatch.setattr(io, "_absent", lambda *a, **k: False)
    slow = ingest(src, tmp_path / "slow", cfg, progress=False)
    assert fast.n_samples == slow.n_samples > 0
    a, b = _content_s1(fast.manifest), _content_s1(slow.manifest)
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


def _content_s1(manifest: Path):
    m = Manifest(manifest)
    r = ShardReader(m)
    rows = m.query("SELECT name, lat, lon, s1_valid FROM samples ORDER BY id")
    pix = [
        (np.asarray(r.arrays(s)["s1"][o]), np.asarray(r.arrays(s)["s1_mask"][o]))
        for s, o in zip(m.samples.shard, m.samples.offset)
    ]
    return rows, [p for pair in pix for p in pair]


def test_an_array_name_with_a_path_in_shard_json_is_refused(tmp_path):
    import json

    src = tmp_path / "src"
    _write_places(src, 1)
    rep = ingest(src, tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    info_path = tmp_path / "dst" / "shards" / "shard-000000" / "shard.json"
    info = json.loads(info_path.read_text())
    info["arrays"]["../../../outside"] = info["arrays"]["s2"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ManifestError, match="not a plain name") as e:
        ShardReader(Manifest(rep.manifest)).arrays(0)
    assert str(info_path) in str(e.value)


def test_a_place_whose_missing_band_file_appears_is_redone(tmp_path):
    import datetime as dt

    from test_ingest import _s2_per_band

    src = tmp_path / "src"
    _s2_per_band(src / "field" / "20210405", dt.date(2021, 4, 5))
    _s2_per_band(src / "field" / "20210610", dt.date(2021, 6, 10))
    b3 = next((src / "field" / "20210610").glob("*_B03.tif"))
    kept = b3.read_bytes()
    b3.unlink()
    cfg = IngestConfig(tile_size=24)
    first = ingest(src, tmp_path / "dst", cfg, progress=False)
    assert not first.ok and all("lacks band(s) B3" in r for _, r in first.bad_files)
    m = Manifest(first.manifest)
    assert {r[0] for r in m.query("SELECT s2_dates FROM samples")} == {"2021-04-05"}
    b3.write_bytes(kept)
    again = ingest(src, tmp_path / "dst", cfg, progress=False)
    assert again.ok and again.n_places_redone == 1 and again.n_samples == first.n_samples
    m = Manifest(again.manifest)
    assert {r[0] for r in m.query("SELECT s2_dates FROM samples")} == {"2021-04-05,2021-06-10"}
    assert m.query("SELECT MIN(id), MAX(id) FROM samples") == [(0, len(m) - 1)]


def test_an_automatic_hr_ratio_past_2048_px_tiles_is_refused(tmp_path):
    """HR much finer than the Sentinel grid (0.2 m aerial beside S2 gave ratio 65, 4160 px HR
    tiles and 43 GB of shards before the disk filled): an automatic ratio past 2048 px tiles is
    one error naming the HR file and what to set, before anything is written."""
    src = tmp_path / "src"
    _cross_crs_place(src)  # HR ~1.2 m over the 10 m grid: ratio 8
    dst = tmp_path / "dst"
    with pytest.raises(io.BadInputError, match=r"ortho\.tif: HR imagery at .* needs hr_ratio 8: "
                       r"HR tiles of 2400 px \(tile_size 300\).*set hr_ratio"):  # fmt: skip
        ingest(src, dst, IngestConfig(tile_size=300), progress=False)
    assert not list(dst.rglob("*.npy"))  # no shard written
    ok = ingest(src, dst, IngestConfig(tile_size=20), progress=False)  # 160 px tiles: fine
    assert ok.ok and ok.n_samples > 0


def test_an_explicit_hr_ratio_past_2048_px_tiles_is_a_warning(tmp_path, caplog):
    """The same HR tiles asked for with hr_ratio are planned, with a warning naming their size."""
    from skysense.data.discover import discover
    from skysense.data.ingest_plan import make_plan

    _cross_crs_place(tmp_path / "src")
    cfg = IngestConfig(tile_size=300, hr_ratio=8)
    with caplog.at_level("WARNING", logger="skysense.data.ingest_plan"):
        plan = make_plan(discover(tmp_path / "src", cfg, []), cfg)
    assert plan.hr_ratio == 8 and plan.tile_size == 300
    assert "HR tiles of 2400 px (tile_size 300 x hr_ratio 8, as set)" in caplog.text


def test_places_linked_into_the_source_are_read(tmp_path):
    """A place folder linked into the source (os.symlink) is discovered like a real one, and a
    link back to the source (a loop) is not followed twice."""
    real, src = tmp_path / "real", tmp_path / "src"
    _write_places(real, 2)
    src.mkdir()
    for p in sorted(real.iterdir()):
        os.symlink(p, src / p.name, target_is_directory=True)
    os.symlink(src, src / "loop", target_is_directory=True)
    a = ingest(real, tmp_path / "a", IngestConfig(tile_size=24, shard_size=4), progress=False)
    b = ingest(src, tmp_path / "b", IngestConfig(tile_size=24, shard_size=4), progress=False)
    assert a.ok and b.ok and b.n_samples == a.n_samples == 2
    assert _content(a.manifest)[0] == _content(b.manifest)[0]

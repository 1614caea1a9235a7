"""Compressed shards (issue 20): codecs round-trip, a compressed ingest reads back like the raw
one (lossless: identical arrays and batches; JPEG: close), and DALI's decoder gives the values
Pillow gives."""

from __future__ import annotations

import numpy as np
import pytest

from skysense.data import build_loader
from skysense.data.ingest import IngestConfig, ingest
from skysense.data.loader import dali_available
from skysense.data.manifest import Manifest
from skysense.data.shard_codecs import decode, encode
from skysense.data.shards import ShardReader, sample_checksums
from tests.data.conftest import RATIO, TILE, planted_place

rng = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(3, 16, 16, 10), (1, 7, 5, 10), (2, 24, 24, 3)])
def test_png16_series_round_trip(shape):
    x = rng.integers(0, 65536, shape, dtype=np.uint16)
    np.testing.assert_array_equal(decode(encode(x, "png16"), "png16", shape), x)


def test_deflate_shuffle_round_trip_keeps_nan():
    x = rng.normal(-12, 5, (2, 8, 8, 2)).astype(np.float32)
    x[0, 1:3] = np.nan
    y = decode(encode(x, "deflate-shuffle"), "deflate-shuffle", x.shape)
    assert y.dtype == np.float32 and np.array_equal(y, x, equal_nan=True)


def test_mask_deflate_round_trip():
    x = (rng.random((3, 9, 7)) > 0.3).astype(np.uint8) * 3
    np.testing.assert_array_equal(decode(encode(x, "deflate"), "deflate", x.shape), x)


def test_hr_png_exact_and_jpeg_close():
    x = (np.add.outer(np.arange(32), np.arange(32))[..., None] * [2, 3, 4] % 256).astype(np.uint8)
    np.testing.assert_array_equal(decode(encode(x, "png"), "png", x.shape), x)
    hi = decode(encode(x, "jpeg", 95), "jpeg", x.shape).astype(float)
    lo = decode(encode(x, "jpeg", 20), "jpeg", x.shape).astype(float)
    assert hi.shape == x.shape
    err_hi, err_lo = np.abs(hi - x).mean(), np.abs(lo - x).mean()
    assert err_hi < 4 and err_hi < err_lo  # quality is applied
    assert len(encode(x, "jpeg", 20)) < len(encode(x, "jpeg", 95))


@pytest.fixture(scope="module")
def raw_and_compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    for i in range(3):
        planted_place(root / "src", f"p{i}", i, n_s2=3, n_s1=2)
    out = {}
    for fmt, codec in (("raw", "jpeg"), ("compressed", "png"), ("compressed", "jpeg")):
        cfg = IngestConfig(
            tile_size=TILE, hr_ratio=RATIO, shard_size=2, shard_format=fmt, hr_codec=codec
        )
        rep = ingest(root / "src", root / f"{fmt}-{codec}", cfg, progress=False)
        assert rep.ok, rep.format()
        out[(fmt, codec)] = Manifest(rep.manifest)
    return out


def test_lossless_compressed_shards_read_back_identical(raw_and_compressed):
    raw = raw_and_compressed[("raw", "jpeg")]
    png = raw_and_compressed[("compressed", "png")]
    shard = png.shard_dir(0)
    for name in ("s2", "s1", "hr", "s2_mask", "hr_mask"):
        assert (shard / f"{name}.enc").is_file() and not (shard / f"{name}.npy").exists()
    assert sample_checksums(png) == sample_checksums(raw)
    a = next(iter(build_loader(raw, None, 3, "torch", seed=1)))
    b = next(iter(build_loader(png, None, 3, "torch", seed=1)))
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        assert np.array_equal(np.asarray(va), np.asarray(vb), equal_nan=True), k


def test_jpeg_shards_keep_sentinel_exact_and_hr_close(raw_and_compressed):
    raw = ShardReader(raw_and_compressed[("raw", "jpeg")])
    jpg = ShardReader(raw_and_compressed[("compressed", "jpeg")])
    for name in ("s2", "s1", "s2_mask", "hr_mask"):
        assert np.array_equal(jpg.arrays(0)[name][1], raw.arrays(0)[name][1], equal_nan=True)
    hr_raw, hr_jpg = raw.arrays(0)["hr"][1].astype(float), jpg.arrays(0)["hr"][1].astype(float)
    assert hr_jpg.shape == hr_raw.shape and np.abs(hr_jpg - hr_raw).mean() < 3


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
def test_dali_decoder_gives_the_lossless_values(raw_and_compressed):
    from skysense.data.dali_decode import decode_batch

    png = ShardReader(raw_and_compressed[("compressed", "png")])
    arrs = png.arrays(0)
    for m in ("s2", "hr"):
        enc = arrs[m]
        got = decode_batch([enc.encoded(i) for i in range(len(enc))], enc.codec, enc.shape[1:])
        for i in range(len(enc)):
            np.testing.assert_array_equal(got[i], enc[i])


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
def test_dali_loader_on_compressed_shards_equals_torch_on_raw(raw_and_compressed, monkeypatch):
    from skysense.data import dali_decode

    calls = []
    orig = dali_decode.decode_batch

    def counted(bufs, codec, shape, device="cpu"):
        calls.append((codec, len(bufs), device))
        return orig(bufs, codec, shape, device)

    monkeypatch.setattr(dali_decode, "decode_batch", counted)
    raw = raw_and_compressed[("raw", "jpeg")]
    png = raw_and_compressed[("compressed", "png")]
    a = next(iter(build_loader(raw, None, 3, "torch", seed=2, views=True)))
    lo = build_loader(png, None, 3, "dali", seed=2, views=True)
    b = next(iter(lo))
    assert lo._dali.hr_encoded
    for v in a:
        assert a[v].keys() == b[v].keys()
        for k in a[v]:
            va, vb = np.asarray(a[v][k]), np.asarray(b[v][k])
            assert np.array_equal(va, vb, equal_nan=True), (v, k)
    # S2 through DALI's decoder before slicing; HR crops decoded inside the view pipeline
    assert {c for c, _, _ in calls} == {"png16"}
    assert all(d == "cpu" for _, _, d in calls)


def test_manifest_of_before_compressed_shards_resumes_and_refuses_another_format(tmp_path):
    from skysense.data.ingest import IngestConflictError
    from skysense.data.manifest import ManifestWriter

    planted_place(tmp_path / "src", "p0", 0, n_s2=2, n_s1=1)
    cfg = dict(tile_size=TILE, hr_ratio=RATIO, progress=False)
    rep = ingest(tmp_path / "src", tmp_path / "dst", **cfg)
    w = ManifestWriter(rep.manifest)  # as written before these settings existed
    stored = w.get_meta("config")
    for k in ("shard_format", "hr_codec", "jpeg_quality"):
        del stored[k]
    w.set_meta(config=stored)
    w.close()
    again = ingest(tmp_path / "src", tmp_path / "dst", **cfg)  # raw = the default: resumes
    assert again.resumed and again.n_samples == rep.n_samples
    with pytest.raises(IngestConflictError, match="shard_format"):
        ingest(tmp_path / "src", tmp_path / "dst", shard_format="compressed", **cfg)


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
def test_dali_plain_batches_on_compressed_shards(raw_and_compressed):
    raw = raw_and_compressed[("raw", "jpeg")]
    png = raw_and_compressed[("compressed", "png")]
    jpg = raw_and_compressed[("compressed", "jpeg")]
    a = next(iter(build_loader(raw, None, 3, "torch", shuffle=False)))
    b = next(iter(build_loader(png, None, 3, "dali", shuffle=False)))
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True), k
    # JPEG: DALI's region decoding of the crop against Pillow's whole decode: close, and the
    # Sentinel arrays exact
    c = next(iter(build_loader(jpg, None, 3, "dali", shuffle=False)))
    d = next(iter(build_loader(jpg, None, 3, "torch", shuffle=False)))
    assert c["hr"].shape == a["hr"].shape
    assert float((c["hr"] - d["hr"]).abs().mean()) < 0.05  # normalised units (std ~58 DN)
    assert float((c["hr"] - a["hr"]).abs().mean()) < 0.1
    assert np.array_equal(np.asarray(c["s2"]), np.asarray(a["s2"]))

"""normalize_crop_flip: the C++ kernel against the numpy sequence it replaces, bit for bit."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from skysense.kernels import data_ops, force_backend, last_backend, normalize_crop_flip
from skysense.kernels.data_ops import normalize_crop_flip_reference, output_map

pytestmark = pytest.mark.unit

needs_cpp = pytest.mark.skipif(
    not data_ops.cpp_available(), reason="skysense.kernels._C was not built"
)


def _stack(rng, dtype, layout, t=3, c=4, h=13, w=11):
    if dtype == np.float32:
        x = rng.normal(100, 30, (t, c, h, w)).astype(np.float32)
        x[0, 1, 2, 3] = np.nan
        x[1, 0, 4, 5] = np.inf
        x[2, 3, 0, 0] = -9999.0
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -500), min(info.max, 2000), (t, c, h, w)).astype(dtype)
        x[0, 2, 1, 1] = 0
    if layout == "THWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def _same(got, want):
    out, valid = got
    rout, rvalid = want
    assert out.dtype == np.float32 and valid.dtype == np.bool_
    assert out.shape == rout.shape and valid.shape == rvalid.shape
    assert np.array_equal(out.view(np.uint32), rout.view(np.uint32)), "values differ in bits"
    assert np.array_equal(valid, rvalid)


@needs_cpp
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("layout", ["TCHW", "THWC"])
def test_cpp_matches_numpy_bit_for_bit(dtype, layout):
    rng = np.random.default_rng(7)
    x = _stack(rng, dtype, layout)
    mean = rng.normal(50, 10, 4)
    std = rng.uniform(5, 40, 4)
    nodata = -9999.0 if dtype == np.float32 else 0
    for hflip, vflip, rot, crop in itertools.product(
        (False, True), (False, True), range(4), (None, (1, 2, 7, 5), (0, 0, 13, 11))
    ):
        kw = dict(layout=layout, crop=crop, hflip=hflip, vflip=vflip, rot90=rot, nodata=nodata)
        got = normalize_crop_flip(x, mean, std, **kw)
        assert last_backend("normalize_crop_flip") == "cpp"
        _same(got, normalize_crop_flip_reference(x, mean, std, **kw))


@needs_cpp
@pytest.mark.parametrize("nodata", [None, 3, 3.0, 2.5, -1, 70000])
def test_nodata_compared_as_numpy_compares_it(nodata):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, (2, 3, 9, 8)).astype(np.uint16)
    kw = dict(crop=(1, 1, 6, 5), rot90=1, nodata=nodata)
    _same(normalize_crop_flip(x, [1, 2, 3], [2, 2, 2], **kw),
          normalize_crop_flip_reference(x, [1, 2, 3], [2, 2, 2], **kw))  # fmt: skip


@needs_cpp
def test_realistic_shard_shape():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10000, (20, 96, 96, 10)).astype(np.uint16)
    mean, std = rng.uniform(500, 2000, 10), rng.uniform(100, 900, 10)
    kw = dict(layout="THWC", crop=(5, 17, 64, 64), hflip=True, rot90=3, nodata=0)
    _same(
        normalize_crop_flip(x, mean, std, **kw), normalize_crop_flip_reference(x, mean, std, **kw)
    )


def test_output_map_matches_numpy_index_grid():
    h, w = 5, 3
    grid = np.arange(h * w).reshape(h, w)
    for hflip, vflip, rot in itertools.product((False, True), (False, True), range(-1, 5)):
        want = grid
        if hflip:
            want = want[:, ::-1]
        if vflip:
            want = want[::-1, :]
        want = np.rot90(want, rot)
        ho, wo, oy, yi, yj, ox, xi, xj = output_map(h, w, hflip, vflip, rot)
        i, j = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        got = grid[oy + yi * i + yj * j, ox + xi * i + xj * j]
        assert np.array_equal(got, want), (hflip, vflip, rot)


def test_forced_numpy_backend_and_errors():
    x = np.zeros((1, 2, 4, 4), np.uint16)
    with force_backend("normalize_crop_flip", "numpy"):
        normalize_crop_flip(x, [0, 0], [1, 1])
    assert last_backend("normalize_crop_flip") == "numpy"
    with pytest.raises(ValueError, match="2 bands"):
        normalize_crop_flip(x, [0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="does not fit in the 4x4 source"):
        normalize_crop_flip(x, [0, 0], [1, 1], crop=(2, 2, 3, 3))
    with pytest.raises(ValueError, match="layout"):
        normalize_crop_flip(x, [0, 0], [1, 1], layout="CHW")


def test_missing_extension_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(data_ops, "_C", None)
    monkeypatch.setattr(data_ops, "_warned", False)
    x = np.arange(32, dtype=np.uint16).reshape(1, 2, 4, 4)
    with caplog.at_level(logging.WARNING, logger="skysense.kernels.data_ops"):
        out, _ = normalize_crop_flip(x, [1, 2], [3, 4])
    assert last_backend("normalize_crop_flip") == "numpy"
    assert any("not available" in r.message for r in caplog.records)
    _same((out, _), normalize_crop_flip_reference(x, [1, 2], [3, 4]))
    with force_backend("normalize_crop_flip", "cpp"), pytest.raises(RuntimeError, match="missing"):
        normalize_crop_flip(x, [1, 2], [3, 4])

"""The embedded sample: real GeoTIFFs with a CRS in both layouts, idempotent and atomic, classes
that the phenology separates better than the per-band means; and plot_sample's PNGs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rasterio

from skysense.data import build_loader
from skysense.data.embedded import CLASSES, ensure_embedded
from skysense.data.manifest import Manifest, ManifestError, ManifestWriter
from skysense.data.plot import plot_sample
from skysense.data.sensors import S2_MEAN, S2_STD

pytestmark = pytest.mark.unit


def test_embedded_sample_contents(embedded_manifest):
    m = Manifest(embedded_manifest)
    assert len(m) == 48 and m.modalities == ("hr", "s2", "s1")
    assert (m.meta["tile_size"], m.meta["hr_ratio"]) == (24, 8)
    assert sorted(set(m.samples.split.tolist())) == ["train", "val"]
    assert (m.samples.split == "val").sum() == 8
    assert m.classes == list(CLASSES) and m.label_kind == "single"
    assert sorted(set(m.samples.label.tolist())) == [0, 1, 2, 3, 4]
    assert not m.bad_files
    raw = embedded_manifest.parent / "raw"
    per_band = list(raw.glob("*/s2/*/*_B8A.tif"))
    stacks = list(raw.glob("*/s2/S2A_MSIL2A_*T103021.tif"))
    assert per_band and stacks and list(raw.glob("*/s2/**/*_CLM.tif"))
    assert list(raw.glob("*/s1/*_VV_db.tif")) and list(raw.glob("*/s1/*T174512_db.tif"))
    with rasterio.open(per_band[0]) as ds:
        assert ds.crs.to_epsg() == 32631 and ds.res == (20.0, 20.0) and ds.dtypes[0] == "uint16"
    with rasterio.open(next(raw.glob("*/hr/*.tif"))) as ds:
        assert ds.res == (1.25, 1.25) and ds.count == 3 and ds.dtypes[0] == "uint8"
        assert ds.tags()["ACQUISITION_DATE"].startswith("2021-")
    b = next(iter(build_loader(m, None, 48, "torch", shuffle=False)))
    n2 = (b["s2_doy"] > 0).sum(1)
    n1 = (b["s1_doy"] > 0).sum(1)
    assert n2.min() >= 6 and n2.max() <= 12 and n1.min() >= 3 and n1.max() <= 8
    # some cloud and nodata pixels, most valid
    frac = b["s2_pixel_valid"][b["s2_doy"] > 0].float().mean()
    assert 0.8 < frac < 0.99
    # dates spread over the year
    doy = b["s2_doy"][b["s2_doy"] > 0]
    assert doy.min() < 60 and doy.max() > 300


def _linear_probe_loo(F: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of a ridge least-squares linear classifier."""
    F = (F - F.mean(0)) / (F.std(0) + 1e-9)
    n, ok = len(y), 0
    for i in range(n):
        tr = np.arange(n) != i
        X = np.c_[F[tr], np.ones(tr.sum())]
        W = np.linalg.solve(X.T @ X + np.eye(X.shape[1]), X.T @ np.eye(5)[y[tr]])
        ok += int(np.argmax(np.r_[F[i], 1.0] @ W) == y[i])
    return ok / n


def test_classes_live_in_the_phenology_not_the_band_means(embedded_manifest):
    b = next(iter(build_loader(embedded_manifest, None, 48, "torch", shuffle=False)))
    y = b["label"].numpy()
    s2, pv, doy = b["s2"].numpy(), b["s2_pixel_valid"].numpy(), b["s2_doy"].numpy()
    s1, pv1, hr = b["s1"].numpy(), b["s1_pixel_valid"].numpy(), b["hr"].numpy()
    means, phen = [], []
    for i in range(len(y)):
        w, w1 = pv[i][:, None], pv1[i][:, None]
        means.append(
            np.concatenate(
                [
                    (s2[i] * w).sum((0, 2, 3)) / w.sum((0, 2, 3)).clip(1),
                    (s1[i] * w1).sum((0, 2, 3)) / w1.sum((0, 2, 3)).clip(1),
                    hr[i].mean((1, 2)),
                ]
            )
        )
        # "Good features": the NDVI profile over the year (interpolated from the clear steps)
        # and the HR texture.
        x = s2[i] * np.array(S2_STD)[:, None, None] + np.array(S2_MEAN)[:, None, None]
        ndvi = (x[:, 6] - x[:, 2]) / (x[:, 6] + x[:, 2] + 1e-6)
        ts = np.flatnonzero((doy[i] > 0) & (pv[i].mean((1, 2)) > 0.5))
        profile = np.interp(
            np.arange(15, 366, 45), doy[i][ts], [ndvi[t][pv[i][t]].mean() for t in ts]
        )
        texture = [
            hr[i].std(),
            np.abs(np.diff(hr[i], axis=1)).mean(),
            np.abs(np.diff(hr[i], axis=2)).mean(),
        ]
        phen.append(np.concatenate([profile, texture]))
    acc_means = _linear_probe_loo(np.array(means), y)
    acc_phen = _linear_probe_loo(np.array(phen), y)
    assert acc_means < 0.7, acc_means  # not trivially separable by per-band means (chance 0.2)
    assert acc_phen > 0.85 and acc_phen > acc_means + 0.2, (acc_phen, acc_means)


def test_ensure_embedded_is_idempotent_and_atomic(tmp_path):
    t0 = time.perf_counter()
    m = ensure_embedded(tmp_path, n_samples=6, seed=3, workers=0)
    assert Manifest(m).meta["embedded"]["n_samples"] == 6
    mtime = m.stat().st_mtime_ns
    t1 = time.perf_counter()
    assert ensure_embedded(tmp_path, n_samples=6, seed=3) == m
    assert m.stat().st_mtime_ns == mtime and time.perf_counter() - t1 < 0.2 * (t1 - t0) + 0.5
    # a manifest left incomplete (an ingest killed before its end) is rebuilt, not used
    w = ManifestWriter(m)
    w.set_meta(complete=False)
    w.close()
    with pytest.raises(ManifestError, match="did not finish"):
        Manifest(m)
    assert ensure_embedded(tmp_path, n_samples=6, seed=3, workers=0) == m
    assert Manifest(m).meta["complete"] and len(Manifest(m)) == 6
    # other parameters: rebuilt to match
    ensure_embedded(tmp_path, n_samples=7, seed=3, workers=0)
    assert len(Manifest(m)) == 7
    with pytest.raises(ValueError, match="n_samples"):
        ensure_embedded(tmp_path, n_samples=2)


def test_plot_sample_writes_pngs(embedded_manifest, tmp_path):
    import matplotlib.image as mpimg

    plain = next(iter(build_loader(embedded_manifest, "val", 2, "torch")))
    views = next(iter(build_loader(embedded_manifest, "train", 2, "torch", views=True)))
    for name, batch in (("plain", plain), ("views", views)):
        path = plot_sample(batch, tmp_path / f"{name}.png", index=1, max_steps=6, title=name)
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # a single sample (no batch dimension) plots too
    one = {k: v[0] for k, v in plain.items()}
    assert plot_sample(one, tmp_path / "one.png").is_file()

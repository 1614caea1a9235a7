"""Pre-training views on planted data: modalities stay aligned, the affine maps view pixels onto
the right tile pixels, step indices and dates follow the series, masks follow padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skysense.data.batch import validate_batch
from skysense.data.loader import build_loader
from skysense.data.sensors import SENSORS
from skysense.data.views import ViewConfig, ViewParams, apply_dihedral, dihedral, view_affine

pytestmark = pytest.mark.unit

S2_MEAN, S2_STD = np.array(SENSORS["s2_l2a"].mean), np.array(SENSORS["s2_l2a"].std)
S1_MEAN, S1_STD = np.array(SENSORS["s1_grd_db"].mean), np.array(SENSORS["s1_grd_db"].std)
HR_MEAN, HR_STD = np.array(SENSORS["hr_rgb"].mean), np.array(SENSORS["hr_rgb"].std)
TILE, RATIO = 24, 8


def _decode(x: torch.Tensor, mean, std, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.rint(x.numpy() * std.reshape(shape) + mean.reshape(shape)).astype(np.int64)


def _tile_pixels(A: np.ndarray, size: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the tile pixel under each view pixel centre, through the affine."""
    c = (2 * np.arange(size) + 1) / size - 1
    px, py = np.meshgrid(c, c)  # x right, y down
    q = A[:, :2] @ np.stack([px.ravel(), py.ravel()]) + A[:, 2:]
    cols = (q[0] + 1) / 2 * tile - 0.5
    rows = (q[1] + 1) / 2 * tile - 0.5
    np.testing.assert_allclose(cols, np.rint(cols), atol=1e-4)  # centres land on centres
    return np.rint(rows).reshape(size, size).astype(int), np.rint(cols).reshape(size, size).astype(
        int
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_views_keep_modalities_aligned(planted_manifest, seed):
    cfg = {"crop": 16, "hr_jitter_p": 0.0, "date_jitter_days": 0, "min_overlap": 0.25}
    loader = build_loader(
        planted_manifest, "train", 4, "torch", views=True, view_config=cfg, seed=seed, epochs=2
    )
    n_checked = 0
    for batch in loader:
        validate_batch(batch, views=True)
        for v in ("view1", "view2"):
            b = batch[v]
            A = b["view_affine"].numpy().astype(np.float64)
            s2 = _decode(b["s2"], S2_MEAN, S2_STD, axis=2)  # (B, T, 10, 16, 16)
            s1 = _decode(b["s1"], S1_MEAN, S1_STD, axis=2)
            hr = _decode(b["hr"], HR_MEAN, HR_STD, axis=1)  # (B, 3, 128, 128)
            for i in range(len(A)):
                rows, cols = _tile_pixels(A[i], 16, TILE)
                for t in np.flatnonzero(b["s2_valid"][i].numpy()):
                    np.testing.assert_array_equal(s2[i, t, 0] - 1, rows)
                    np.testing.assert_array_equal(s2[i, t, 1] - 1, cols)
                    # band 2 holds the step's index in the full series
                    assert (s2[i, t, 2] - 1 == int(b["s2_index"][i, t])).all()
                for t in np.flatnonzero(b["s1_valid"][i].numpy()):
                    np.testing.assert_array_equal(s1[i, t, 0], rows)
                    np.testing.assert_array_equal(s1[i, t, 1], cols)
                hrows, hcols = _tile_pixels(A[i], 16 * RATIO, TILE * RATIO)
                # HR red/green = 10 x the Sentinel pixel under it: the same ground as S2
                np.testing.assert_array_equal(hr[i, 0], (hrows // RATIO) * 10)
                np.testing.assert_array_equal(hr[i, 1], (hcols // RATIO) * 10)
                np.testing.assert_array_equal(hr[i, 2], (hrows % RATIO) * 8 + hcols % RATIO)
                n_checked += 1
    assert n_checked == 2 * 2 * 4  # 2 epochs x 1 batch of 4 x 2 views


def test_affine_matches_grid_sample_and_views_overlap(planted_manifest):
    """torch's affine_grid + grid_sample on the whole tile reproduces each view (the way the
    losses use view_affine), and A2^-1 A1 carries view-1 pixels onto the same ground in view 2."""
    cfg = {"crop": 16, "hr_jitter_p": 0.0, "min_overlap": 0.5}
    views = next(
        iter(
            build_loader(planted_manifest, "train", 4, "torch", views=True, view_config=cfg, seed=7)
        )
    )
    tiles = next(iter(build_loader(planted_manifest, "train", 4, "torch", shuffle=False)))
    by_id = {int(s): i for i, s in enumerate(tiles["sample_id"])}
    for v in ("view1", "view2"):
        b = views[v]
        idx = [by_id[int(s)] for s in b["sample_id"]]
        grid = F.affine_grid(b["view_affine"], (len(idx), 3, 128, 128), align_corners=False)
        resampled = F.grid_sample(tiles["hr"][idx], grid, mode="nearest", align_corners=False)
        torch.testing.assert_close(b["hr"], resampled, rtol=0, atol=1e-5)
        grid = F.affine_grid(b["view_affine"], (len(idx), 10, 16, 16), align_corners=False)
        for i in range(len(idx)):
            for t in np.flatnonzero(b["s2_valid"][i].numpy()):
                k = int(b["s2_index"][i, t])  # the tile's step k is the view's step t
                whole = tiles["s2"][idx[i], k][None]
                res = F.grid_sample(whole, grid[i : i + 1], mode="nearest", align_corners=False)
                torch.testing.assert_close(b["s2"][i, t], res[0], rtol=0, atol=1e-5)
    A1 = views["view1"]["view_affine"].double().numpy()
    A2 = views["view2"]["view_affine"].double().numpy()
    for i in range(len(A1)):
        # overlap of the two crops (in tile normalised units, axis-aligned boxes)
        def box(A):
            corners = A[:, :2] @ np.array([[-1, 1, -1, 1], [-1, -1, 1, 1]]) + A[:, 2:]
            return corners.min(1), corners.max(1)

        (lo1, hi1), (lo2, hi2) = box(A1[i]), box(A2[i])
        inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None).prod()
        assert inter / (hi1 - lo1).prod() >= 0.5 - 1e-6
        # A2^-1 (A1 p): the same ground, found in view 2's pixels
        M2 = np.vstack([A2[i], [0, 0, 1]])
        M1 = np.vstack([A1[i], [0, 0, 1]])
        c = (2 * np.arange(16) + 1) / 16 - 1
        px, py = np.meshgrid(c, c)
        p = np.stack([px.ravel(), py.ravel(), np.ones(256)])
        q = (np.linalg.inv(M2) @ M1 @ p)[:2]
        inside = (np.abs(q) < 1).all(0)
        assert inside.mean() >= 0.5 - 1e-6
        s2a = _decode(views["view1"]["s2"][i, 0, :2], S2_MEAN[:2], S2_STD[:2], axis=0).reshape(
            2, -1
        )
        s2b = _decode(views["view2"]["s2"][i, 0, :2], S2_MEAN[:2], S2_STD[:2], axis=0)
        j2 = np.rint((q[0] + 1) / 2 * 16 - 0.5).astype(int)[inside]
        i2 = np.rint((q[1] + 1) / 2 * 16 - 0.5).astype(int)[inside]
        np.testing.assert_array_equal(s2a[:, inside], s2b[:, i2, j2])


def test_temporal_subsampling_and_padding_masks(planted_manifest):
    cfg = {"crop": 16, "max_steps": {"s2": 3, "s1": 2}, "date_jitter_days": 0}
    b = next(
        iter(
            build_loader(planted_manifest, "train", 4, "torch", views=True, view_config=cfg, seed=3)
        )
    )
    for v in ("view1", "view2"):
        x = b[v]
        assert x["s2"].shape[1] <= 3 and x["s1"].shape[1] <= 2
        for m in ("s2", "s1"):
            idx, valid, doy = x[f"{m}_index"], x[f"{m}_valid"], x[f"{m}_doy"]
            pad = idx < 0
            assert not valid[pad].any() and (doy[pad] == 0).all()
            assert not x[f"{m}_pixel_valid"][pad].any()
            assert (x[m][pad] == 0).all()
            for i in range(len(idx)):  # chosen steps in date order, no repeats
                real = idx[i][~pad[i]]
                assert torch.all(real[1:] > real[:-1])
    # the two views draw their steps independently: somewhere they differ
    assert not torch.equal(b["view1"]["s2_index"], b["view2"]["s2_index"])


def test_date_jitter_moves_doy_within_bounds(planted_manifest):
    base = next(iter(build_loader(planted_manifest, "train", 4, "torch", shuffle=False)))
    doy = {int(s): base["s2_doy"][i] for i, s in enumerate(base["sample_id"])}
    cfg = {"crop": 16, "date_jitter_days": 5}
    b = next(
        iter(
            build_loader(planted_manifest, "train", 4, "torch", views=True, view_config=cfg, seed=5)
        )
    )
    moved = 0
    for i, s in enumerate(b["view1"]["sample_id"].tolist()):
        for t in np.flatnonzero(b["view1"]["s2_index"][i].numpy() >= 0):
            k = int(b["view1"]["s2_index"][i, t])
            d = int(b["view1"]["s2_doy"][i, t]) - int(doy[s][k])
            assert -5 <= d <= 5
            moved += d != 0
    assert moved > 0


def test_hr_photometric_only_on_hr(planted_manifest):
    on = {"crop": 16, "hr_jitter_p": 1.0, "date_jitter_days": 0}
    off = dict(on, hr_jitter_p=0.0)
    a = next(
        iter(
            build_loader(planted_manifest, "train", 4, "torch", views=True, view_config=on, seed=1)
        )
    )
    b = next(
        iter(
            build_loader(planted_manifest, "train", 4, "torch", views=True, view_config=off, seed=1)
        )
    )
    for v in ("view1", "view2"):
        assert not torch.equal(a[v]["hr"], b[v]["hr"])
        assert torch.equal(a[v]["s2"], b[v]["s2"]) and torch.equal(a[v]["s1"], b[v]["s1"])


def test_dihedral_and_affine_units():
    x = np.arange(25).reshape(5, 5)
    for h in (False, True):
        for v in (False, True):
            for k in range(4):
                t, h2, v2 = dihedral(h, v, k)
                p = ViewParams(0, 0, 5, h, v, k, {}, {}, (1, 1, 1))
                z = x.T if t else x
                z = z[:, ::-1] if h2 else z
                z = z[::-1] if v2 else z
                np.testing.assert_array_equal(z, apply_dihedral(x, p))
    # identity view of the whole tile: the identity affine
    p = ViewParams(0, 0, 24, False, False, 0, {}, {}, (1, 1, 1))
    np.testing.assert_allclose(view_affine(p, 24), [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="min_overlap"):
        ViewConfig(min_overlap=1.5)
    with pytest.raises(ValueError, match="unknown view_config"):
        ViewConfig.from_dict({"crop_size": 3})


def test_views_do_not_depend_on_how_samples_were_sharded(planted_manifest, tmp_path):
    """Random draws see only a sample's own series, not the padding of its shard."""
    from skysense.data.ingest import IngestConfig, ingest

    src = planted_manifest.parent.parent / "src"
    rep = ingest(
        src, tmp_path, IngestConfig(tile_size=24, hr_ratio=8, shard_size=1), progress=False
    )
    cfg = {"crop": 16, "max_steps": {"s2": 2, "s1": 2}}
    a = list(build_loader(planted_manifest, None, 3, "torch", views=True, view_config=cfg, seed=4))
    b = list(build_loader(rep.manifest, None, 3, "torch", views=True, view_config=cfg, seed=4))
    for x, y in zip(a, b, strict=True):
        for v in ("view1", "view2"):
            for k in x[v]:
                assert torch.equal(x[v][k], y[v][k]), (v, k)

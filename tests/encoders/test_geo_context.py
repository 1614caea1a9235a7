"""The lat/lon -> region function (equal area, wrapping, NaN) and the geo-context read-out
against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from skysense.encoders.geo_context import GeoContext, latlon_to_region

pytestmark = pytest.mark.unit


def test_region_known_values():
    ll = torch.tensor(
        [
            [0.0, -180.0],  # equator, first sector: band 4 of 8 starts at sin = 0
            [-90.0, -180.0],  # south pole: band 0
            [90.0, 179.999],  # north pole, last sector
            [0.0, 180.0],  # 180 wraps onto -180
            [float("nan"), 10.0],
            [10.0, float("nan")],
            [-0.001, 0.0],  # just south of the equator: band 3, sector 4 of 8
        ]
    )
    r = latlon_to_region(ll, 64, 8)
    assert r.dtype == torch.int64
    assert r.tolist() == [4 * 8 + 0, 0, 7 * 8 + 7, 4 * 8 + 0, -1, -1, 3 * 8 + 4]


def test_region_band_edges_are_equal_area():
    # band k of n ends at sin(lat) = -1 + 2 (k + 1) / n
    n = 4
    for k in range(n - 1):
        edge = math.degrees(math.asin(-1 + 2 * (k + 1) / n))
        below = latlon_to_region(torch.tensor([[edge - 1e-6, 0.0]]), n * 2, n)
        above = latlon_to_region(torch.tensor([[edge + 1e-6, 0.0]]), n * 2, n)
        assert below.item() // 2 == k and above.item() // 2 == k + 1


def test_regions_are_equal_area_under_uniform_sphere_sampling():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    lat = torch.rad2deg(torch.asin(v[:, 2]))
    lon = torch.rad2deg(torch.atan2(v[:, 1], v[:, 0]))
    r = latlon_to_region(torch.stack([lat, lon], 1), 64, 8)
    counts = torch.bincount(r, minlength=64).double()
    expected = n / 64
    # binomial spread: sd = sqrt(n p (1 - p)) ~ 55; allow 5 sd
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_readout_matches_formula():
    torch.manual_seed(0)
    geo = GeoContext(num_regions=6, num_prototypes=5, dim=8, lat_bands=2).double()
    fused = torch.randn(3, 7, 8, dtype=torch.float64)
    region = torch.tensor([4, -1, 0])
    out = geo(fused, region)
    for b in range(3):
        if region[b] < 0:
            assert (out[b] == 0).all()
            continue
        P = geo.prototypes[region[b]]
        for loc in range(7):
            f = fused[b, loc]
            w = torch.exp(P @ f / math.sqrt(8))
            expected = (w / w.sum()) @ P
            torch.testing.assert_close(out[b, loc], expected)


def test_prototypes_are_a_persistent_buffer_without_gradient():
    geo = GeoContext(8, 3, 4, 2)
    assert geo.prototypes.shape == (8, 3, 4) and geo.prototypes.dtype == torch.float32
    assert not geo.prototypes.requires_grad
    assert "prototypes" in geo.state_dict()
    assert not list(geo.parameters())
    torch.testing.assert_close(geo.prototypes.norm(dim=-1), torch.ones(8, 3))
    fused = torch.randn(2, 5, 4, requires_grad=True)
    geo(fused, torch.tensor([1, 7])).sum().backward()
    assert fused.grad is not None and geo.prototypes.grad is None
    with pytest.raises(ValueError, match="latitude bands"):
        GeoContext(10, 3, 4, 3)

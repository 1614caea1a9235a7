"""GCPL: the prototype EMA against a naive region-by-region float64 loop."""

from __future__ import annotations

import losses_naive as naive
import pytest
import torch

from skysense.losses import GeoContextPrototypeLearning

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("h", "w", "n_p"), [(3, 3, 5), (2, 5, 7), (1, 1, 3)])
def test_update_against_naive(h, w, n_p):
    n_r, d, b = 6, 9, 7
    protos = torch.randn(n_r, n_p, d)
    fused = torch.randn(b, d, h, w)
    region = torch.tensor([2, -1, 2, 0, 5, -1, 0])
    exp = naive.gcpl_update(protos, fused, region, 0.9, iters=3, eps=0.1)
    before = protos.clone()
    stats = GeoContextPrototypeLearning(momentum=0.5, epsilon=0.1).update(
        protos, fused, region, 0.9
    )
    assert stats == {"regions": 3, "locations": 5 * h * w}
    torch.testing.assert_close(protos.double(), exp, rtol=1e-5, atol=1e-5)
    for r in (1, 3, 4):  # no sample there: unchanged, bit for bit
        assert torch.equal(protos[r], before[r])
    assert not torch.equal(protos[2], before[2])


def test_unknown_regions_only_and_momentum_one():
    protos = torch.randn(3, 4, 5)
    before = protos.clone()
    g = GeoContextPrototypeLearning()
    assert g.update(protos, torch.randn(2, 5, 2, 2), torch.tensor([-1, -1]))["regions"] == 0
    assert torch.equal(protos, before)
    g.update(protos, torch.randn(2, 5, 2, 2), torch.tensor([0, 1]), momentum=1.0)
    assert torch.equal(protos, before)


def test_features_equal_to_prototypes_are_a_fixed_point():
    """Each location sits exactly on one prototype and the assignment is sharp: the update
    leaves the prototypes where they are."""
    n_p, d = 4, 6
    p = torch.nn.functional.normalize(torch.randn(n_p, d), dim=-1) * 3
    fused = p.t().reshape(1, d, 2, 2)
    protos = p[None].clone()
    GeoContextPrototypeLearning(momentum=0.0, epsilon=0.01, sinkhorn_iters=20).update(
        protos, fused, torch.tensor([0])
    )
    torch.testing.assert_close(protos[0], p, rtol=1e-3, atol=1e-3)


def test_bad_input_is_named():
    g = GeoContextPrototypeLearning()
    with pytest.raises(ValueError, match="outside"):
        g.update(torch.zeros(3, 2, 4), torch.zeros(1, 4, 2, 2), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"fused must be \(B, 4, h, w\)"):
        g.update(torch.zeros(3, 2, 4), torch.zeros(1, 5, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"region must be \(B,\)"):
        g.update(torch.zeros(3, 2, 4), torch.zeros(2, 4, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="momentum"):
        GeoContextPrototypeLearning(momentum=1.5)

"""Sinkhorn-Knopp in grouped mode (one independent balanced assignment per group of rows),
every backend against a plain float64 loop over the groups, at odd sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from skysense.kernels import force_backend, last_backend, sinkhorn_knopp
from skysense.kernels.sinkhorn import sinkhorn_knopp_reference


def plain_sinkhorn(scores, groups, n_iters, eps):
    """Textbook Sinkhorn-Knopp per group, float64: exp, then alternately columns to n_g / K and
    rows to 1."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for g in groups.unique().tolist():
        rows = groups == g
        q = torch.exp(scores[rows].double() / eps)
        n, k = q.shape
        for _ in range(n_iters):
            q = q / q.sum(0, keepdim=True) * (n / k)
            q = q / q.sum(1, keepdim=True)
        out[rows] = q
    return out


def _case(sizes, k, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    scores = torch.rand(groups.numel(), k, generator=g) * 2 - 1
    if shuffle:  # the rows of a group need not be contiguous
        perm = torch.randperm(groups.numel(), generator=g)
        scores, groups = scores[perm], groups[perm]
    return scores, groups


_SIZES = [([1], 1), ([7], 5), ([5, 1, 9, 4], 6), ([40, 12, 7], 3), ([3, 0, 17], 129)]


@pytest.mark.unit
@pytest.mark.parametrize(("sizes", "k"), _SIZES)
@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_grouped_torch(sizes, k, backend, eps):
    scores, groups = _case(sizes, k)
    with force_backend("sinkhorn_knopp", backend):
        got = sinkhorn_knopp(scores.double(), 3, eps, groups=groups, n_groups=len(sizes) + 2)
    assert last_backend("sinkhorn_knopp") == backend
    assert_close(got, plain_sinkhorn(scores, groups, 3, eps), 1e-12, 1e-9, "grouped sinkhorn")
    got32 = sinkhorn_knopp(scores, 3, eps, groups=groups, n_groups=len(sizes))
    assert got32.dtype == torch.float32
    assert_close(got32, plain_sinkhorn(scores, groups, 3, eps), 1e-6, 1e-5, "fp32 in")


@pytest.mark.triton
@pytest.mark.parametrize(("sizes", "k"), _SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_triton(triton_cpu, sizes, k, dtype):
    scores, groups = _case(sizes, k, seed=1)
    scores = scores.to(dtype)
    with force_backend("sinkhorn_knopp", "triton"):
        got = sinkhorn_knopp(scores, 3, 0.05, groups=groups, n_groups=len(sizes) + 1)
    assert last_backend("sinkhorn_knopp") == "triton"
    assert got.dtype == dtype
    atol, rtol = (1e-6, 1e-4) if dtype == torch.float32 else (1e-3, 1e-2)
    assert_close(got, plain_sinkhorn(scores, groups, 3, 0.05), atol, rtol, "grouped triton")


@pytest.mark.unit
def test_one_group_is_the_ungrouped_op():
    """One group through the grouped engine equals the ungrouped reference (a separate code
    path: ``_reference_one``)."""
    scores, groups = _case([37], 11, shuffle=False)
    got = sinkhorn_knopp(scores, 3, 0.05, groups=groups, n_groups=1)
    want = sinkhorn_knopp_reference(scores.double(), 3, 0.05).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_grouped_marginals():
    sizes, k = [40, 12, 7], 5
    scores, groups = _case(sizes, k)
    few = sinkhorn_knopp(scores, 3, 0.05, groups=groups, n_groups=3)
    torch.testing.assert_close(few.sum(1), torch.ones(groups.numel()))  # rows exact after any n
    many = sinkhorn_knopp(scores, 500, 0.05, groups=groups, n_groups=3).double()
    for g, s in enumerate(sizes):
        cols = many[groups == g].sum(0)
        want = torch.full((k,), s / k, dtype=torch.float64)
        torch.testing.assert_close(cols, want, rtol=1e-3, atol=1e-3)
    assert (few >= 0).all()


@pytest.mark.unit
def test_extreme_scores_stay_finite():
    scores = torch.tensor([[50.0, -50.0], [49.0, -60.0], [-100.0, 100.0]])
    q = sinkhorn_knopp(scores, 3, 0.01, groups=torch.tensor([0, 0, 1]), n_groups=2)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(3))


@pytest.mark.unit
def test_grouped_bad_input():
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_knopp(torch.rand(3, 2), 0, groups=torch.zeros(3, dtype=torch.long), n_groups=1)
    with pytest.raises(ValueError, match=r"groups must be \(N,\)"):
        sinkhorn_knopp(torch.rand(3, 2), groups=torch.zeros(4, dtype=torch.long), n_groups=1)
    with pytest.raises(ValueError, match=r"scores must be \(N, K\)"):
        sinkhorn_knopp(torch.rand(3), groups=torch.zeros(3, dtype=torch.long), n_groups=1)

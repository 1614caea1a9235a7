"""Grouped Sinkhorn-Knopp: one independent balanced assignment per group of rows."""

from __future__ import annotations

import pytest
import torch
from losses_naive import sinkhorn as naive_sinkhorn

from skysense.kernels import sinkhorn_knopp
from skysense.losses import grouped_sinkhorn_knopp

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 5), (64, 3), (3, 17)])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_one_group_is_the_kernels_sinkhorn(n, k, eps):
    scores = torch.rand(n, k) * 2 - 1
    got = grouped_sinkhorn_knopp(scores, torch.zeros(n, dtype=torch.long), 1, 3, eps)
    torch.testing.assert_close(got, sinkhorn_knopp(scores, 3, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), naive_sinkhorn(scores, 3, eps), rtol=1e-5, atol=1e-6)


def test_groups_are_independent():
    sizes, k = [5, 1, 9, 4], 6
    parts = [torch.rand(s, k) * 2 - 1 for s in sizes]
    groups = torch.cat([torch.full((s,), g) for g, s in enumerate(sizes)])
    perm = torch.randperm(groups.numel())  # rows of a group need not be contiguous
    scores = torch.cat(parts)
    got = grouped_sinkhorn_knopp(scores[perm], groups[perm], len(sizes) + 2, 3, 0.1)
    back = torch.empty_like(got)
    back[perm] = got
    for g, part in enumerate(back.split(sizes)):
        torch.testing.assert_close(
            part.double(), naive_sinkhorn(parts[g], 3, 0.1), rtol=1e-5, atol=1e-6
        )


def test_marginals():
    sizes, k = [40, 12, 7], 5
    groups = torch.cat([torch.full((s,), g) for g, s in enumerate(sizes)])
    scores = torch.rand(groups.numel(), k) * 2 - 1
    few = grouped_sinkhorn_knopp(scores, groups, 3, 3, 0.05)
    torch.testing.assert_close(few.sum(1), torch.ones(groups.numel()))  # rows exact after any n
    many = grouped_sinkhorn_knopp(scores, groups, 3, 500, 0.05).double()
    for g, s in enumerate(sizes):
        cols = many[groups == g].sum(0)
        torch.testing.assert_close(
            cols, torch.full((k,), s / k, dtype=torch.float64), rtol=1e-3, atol=1e-3
        )
    assert (few >= 0).all()


def test_extreme_scores_stay_finite():
    scores = torch.tensor([[50.0, -50.0], [49.0, -60.0], [-100.0, 100.0]])
    q = grouped_sinkhorn_knopp(scores, torch.tensor([0, 0, 1]), 2, 3, 0.01)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(3))


def test_bad_input():
    with pytest.raises(ValueError, match="n_iters"):
        grouped_sinkhorn_knopp(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), 1, 0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        grouped_sinkhorn_knopp(torch.rand(3, 2), torch.zeros(4, dtype=torch.long), 1)

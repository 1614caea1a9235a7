"""Sinkhorn-Knopp with uniform marginals, run independently over many groups of rows at once.

``skysense.kernels.sinkhorn_knopp`` balances one (N, K) score matrix. The losses need many small
independent problems: the pixels of each image (object-level clustering) or of each geo-context
region (GCPL), with a variable number of rows each. Here every row carries a group id; the
per-column sums are taken per group (and all-reduced across processes for the distributed GCPL
update), the per-row sums are local. On a single group it is the same iteration as the kernel's
(tested against it).
"""

from __future__ import annotations

import torch

from skysense.losses.distributed import all_reduce_, is_distributed


@torch.no_grad()
def grouped_sinkhorn_knopp(
    scores: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    n_iters: int = 3,
    epsilon: float = 0.05,
    distributed: bool = False,
) -> torch.Tensor:
    """Balanced soft assignments of each group's rows to K columns.

    For the rows of group g (n_g of them), Q = exp(scores / epsilon) is alternately rescaled so
    that every column sums to n_g / K and every row sums to 1 (``n_iters`` rounds, ending on the
    rows, as SwAV and DINOv2 do), i.e. uniform marginals within each group.

    Args:
        scores: (N, K) float similarities (cosines in the callers).
        groups: (N,) int64 in [0, n_groups): the group of each row.
        n_groups: number of groups (some may be empty here, e.g. present on another process).
        distributed: all-reduce the per-group column sums (and the stabilising per-group maxima)
            across processes, so the rows of one group spread over several processes are
            balanced together; every process must call with the same ``n_groups`` and the same
            group numbering.

    Returns:
        (N, K) assignments in ``scores.dtype``, rows summing to 1. No gradient.
    """
    if scores.ndim != 2 or groups.shape != scores.shape[:1]:
        raise ValueError(
            f"grouped_sinkhorn_knopp: scores must be (N, K) and groups (N,), got "
            f"{tuple(scores.shape)} and {tuple(groups.shape)}"
        )
    if n_iters < 1:
        raise ValueError(f"grouped_sinkhorn_knopp: n_iters must be >= 1, got {n_iters}")
    if epsilon <= 0:
        raise ValueError(f"grouped_sinkhorn_knopp: epsilon must be > 0, got {epsilon}")
    n, k = scores.shape
    dist_on = distributed and is_distributed()
    s = scores.double()
    # A constant per group cancels at the first column normalisation; the group's maximum keeps
    # exp() in range. It must be the same on every process, hence the max-reduce.
    gmax = torch.full((n_groups,), -torch.inf, dtype=s.dtype, device=s.device)
    if n:
        gmax.scatter_reduce_(0, groups, s.amax(dim=1), reduce="amax")
    if dist_on:
        all_reduce_(gmax, "max")
    q = torch.exp((s - gmax[groups, None]) / epsilon)
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iters):
        col = torch.zeros(n_groups, k, dtype=q.dtype, device=q.device).index_add_(0, groups, q)
        if dist_on:
            all_reduce_(col)
        q /= col[groups].clamp_min(tiny)
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny)
    return q.to(scores.dtype)

"""Sinkhorn-Knopp with uniform marginals: (N, K) scores -> (N, K) soft assignments whose rows
sum to 1 and whose columns sum to N / K (SwAV, DINOv2's centring, the object clustering of MGCL,
the GCPL prototype step), over one problem or many independent groups of rows at once.

Grouped mode: every row carries a group id (the pixels of one image, the locations of one
geo-context region); the balancing over rows is done within each group (its columns sum to
n_g / K), the rows' own normalisation is local. Distributed mode: the rows are spread over the
torch.distributed ranks; the sums over rows (per group) and the maxima that keep exp() in range
are all-reduced, so every rank gets its own rows of the assignment one process would compute on
the concatenated rows. Both modes combine; without groups every row is in group 0.

The reference normalises a (K, N) matrix in place, alternately over prototypes and samples. The
other backends keep the matrix implicit as Q_nk = E_nk r_{g(n) k} c_n with
E = exp((S - m_n) / eps) (m_n the row's max) and only iterate the scaling vectors,

    r_gk <- 1 / (K sum_{n in g} E_nk c_n),    c_n <- 1 / (N_g sum_k E_nk r_{g(n) k}),

(N_g the rows of group g over every rank), which is the same sequence of normalisations: each
overwrites the previous scale of its axis, so the initial global normalisation drops out; the
factors K and N_g keep both axes at the same total mass, so the scales do not drift over
many iterations. The row maxima are
absorbed by c_n, which starts at exp((m_n - M_g) / eps), M_g the group's max over every rank,
the reference's shift: it changes nothing but the range of exp.

Backends: ``triton`` (CUDA, or forced under the interpreter: exp recomputed on the fly in fp32,
the output written once), ``chunked`` (torch, in float32, float64 for float64 scores: E
stored once, the sums by matrix-vector products or one ``index_add_`` per pass), ``reference`` (one process).
"""

from __future__ import annotations

import torch

from skysense.kernels import dispatch
from skysense.kernels import distributed as sdist

OP = "sinkhorn_knopp"
BACKENDS = ("triton", "chunked", "reference")


def _reference_one(scores, n_iters, epsilon):
    q = torch.exp((scores - scores.max()) / epsilon).t().double()  # (K, N)
    q /= q.sum()
    k, n = q.shape
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t().to(scores.dtype)


@torch.no_grad()
def sinkhorn_knopp_reference(scores, n_iters=3, epsilon=0.05, groups=None, n_groups=None):
    """Sinkhorn-Knopp with uniform marginals, one group at a time: (N, K) scores -> (N, K)
    assignments whose rows sum to 1 and whose columns sum, within each group of ``groups``
    ((N,) int64, None: one group), to its number of rows / K."""
    if groups is None:
        return _reference_one(scores, n_iters, epsilon)
    out = torch.zeros_like(scores)
    for g in groups.unique().tolist():
        rows = groups == g
        out[rows] = _reference_one(scores[rows], n_iters, epsilon)
    return out


def _group_max(row_max, groups, n_groups, distributed):
    """(G,) float64 max of each group's row maxima (over every rank when distributed)."""
    gmax = torch.full((n_groups,), -torch.inf, dtype=torch.float64, device=row_max.device)
    if row_max.numel():
        gmax.scatter_reduce_(0, groups, row_max.double(), reduce="amax")
    if distributed:
        sdist.all_reduce_max_(gmax)
    return gmax


def _group_rows(groups, n_groups, distributed):
    """(G,) float64 number of rows of each group (over every rank when distributed)."""
    counts = torch.bincount(groups, minlength=n_groups).double()
    if distributed:
        sdist.all_reduce_sum_(counts)
    return counts


def _group_sum(x, groups, n_groups, c):
    """(G, K): sum over each group's rows of ``x`` (N, K) weighted by ``c`` (N,)."""
    if n_groups == 1:
        return (c @ x)[None]
    return torch.zeros(n_groups, x.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, groups, x * c[:, None]
    )


def _row_sum(x, r, groups, n_groups):
    """(N,): sum over each row of ``x`` (N, K) weighted by its group's ``r`` (G, K)."""
    if n_groups == 1:
        return x @ r[0]
    return (x * r[groups]).sum(dim=1)


@torch.no_grad()
def _no_iterations(scores, epsilon, distributed):
    """n_iters == 0 (one group): only the global normalisation, columns summing to N / K on
    average."""
    m = scores.max().to(torch.float64).reshape(1)
    if distributed:
        sdist.all_reduce_max_(m)
    e = torch.exp((scores.double() - m) / epsilon)
    total = e.sum().reshape(1)
    n = torch.tensor([float(scores.shape[0])], dtype=torch.float64, device=scores.device)
    if distributed:
        sdist.all_reduce_sum_(total)
        sdist.all_reduce_sum_(n)
    return (e * (n / total)).to(scores.dtype)


@torch.no_grad()
def _chunked(scores, groups, n_groups, n_iters, epsilon, distributed):
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    row_max = s.amax(dim=1, keepdim=True)
    gmax = _group_max(row_max.reshape(-1), groups, n_groups, distributed)
    e = (s - row_max).div_(epsilon).exp_()  # (N, K), the only N x K buffer
    c = torch.exp((row_max.reshape(-1) - gmax[groups]) / epsilon).to(e.dtype)
    n_rows = _group_rows(groups, n_groups, distributed)[groups].to(e.dtype)  # (N,) N_g of row
    k = scores.shape[1]
    tiny = torch.finfo(e.dtype).tiny
    r = None
    for _ in range(n_iters):
        col = _group_sum(e, groups, n_groups, c)
        if distributed:
            sdist.all_reduce_sum_(col)
        r = 1.0 / (k * col).clamp_min(tiny)  # (G, K)
        c = 1.0 / (n_rows * _row_sum(e, r, groups, n_groups)).clamp_min(tiny)
    e.mul_(r[0][None] if n_groups == 1 else r[groups]).mul_((n_rows * c)[:, None])
    return e.to(scores.dtype)


def _choose(scores) -> str:
    triton = lambda: dispatch.triton_reason(scores)  # noqa: E731
    auto = ("triton",) if scores.is_cuda else ()
    return dispatch.choose(OP, BACKENDS, {"triton": triton}, auto, "chunked")


@torch.no_grad()
def sinkhorn_knopp(scores, n_iters=3, epsilon=0.05, distributed=False, groups=None, n_groups=None):
    """Sinkhorn-Knopp assignments with uniform marginals (no gradient).

    Args:
        scores: (N, K) float (e.g. cosine similarities of N samples to K prototypes).
        n_iters: alternating normalisations (prototypes, then samples) to run (>= 1 with
            groups).
        epsilon: entropic regularisation: Q ~ exp(scores / epsilon).
        distributed: the rows are spread over the torch.distributed ranks: sums over rows and
            the stabilising maxima are all-reduced (each rank gets its own rows back); every
            rank must call with the same ``n_groups`` and group numbering.
        groups: (N,) int64 in [0, n_groups): balance each group's rows separately (None: one
            group of every row).
        n_groups: the number of groups (some may have no row here, e.g. rows on another rank).

    Returns:
        (N, K) in the dtype of ``scores``: rows sum to 1 and each group's columns to its number
        of rows (over every rank) / K (after at least one iteration).
        ``last_backend("sinkhorn_knopp")`` names the backend.
    """
    if scores.dim() != 2:
        raise ValueError(f"{OP}: scores must be (N, K), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"{OP}: epsilon must be > 0, got {epsilon}")
    if n_iters < 0 or (groups is not None and n_iters < 1):
        raise ValueError(f"{OP}: n_iters must be >= 1 with groups (>= 0 without), got {n_iters}")
    if groups is not None:
        if groups.shape != scores.shape[:1] or n_groups is None:
            raise ValueError(
                f"{OP}: groups must be (N,) = ({scores.shape[0]},) with n_groups given, got "
                f"{tuple(groups.shape)} and n_groups={n_groups}"
            )
        groups = groups.long()
    distributed = bool(distributed) and sdist.is_distributed()
    backend = _choose(scores)
    if backend == "reference":
        if distributed:
            raise RuntimeError(f"{OP}: the reference backend is single-process (distributed=True)")
        out = sinkhorn_knopp_reference(scores, n_iters, epsilon, groups, n_groups)
    elif n_iters == 0:
        out = _no_iterations(scores, epsilon, distributed)
    else:
        if groups is None:
            n_groups = 1
            groups = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        if backend == "triton":
            from skysense.kernels.triton_sinkhorn import sinkhorn_triton

            out = sinkhorn_triton(scores, groups, n_groups, n_iters, epsilon, distributed)
        else:
            out = _chunked(scores, groups, n_groups, n_iters, epsilon, distributed)
    dispatch.record(OP, backend)
    return out

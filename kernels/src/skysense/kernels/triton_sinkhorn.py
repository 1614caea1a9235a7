"""Triton kernels of Sinkhorn-Knopp (``sinkhorn``): the scaling vectors of every group of rows,
with exp recomputed from the scores in every pass and the (N, K) output written once. Three
kernels, one per pass: column sums per group, row sums, the final write. Every kernel
accumulates in fp32 whatever it reads (fp32, fp16, bf16).

Only imported when the Triton backend is asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from skysense.kernels import dispatch
from skysense.kernels import distributed as sdist
from skysense.kernels import launch_configs as lc
from skysense.kernels.triton_losses import _launch


@triton.jit
def _sk_tile(S, RMAX, rows, row_ok, offs_k, K, ssn, ssk, inv_eps):
    msk = row_ok[:, None] & (offs_k < K)[None, :]
    s = tl.load(S + rows[:, None] * ssn + offs_k[None, :] * ssk, mask=msk, other=0.0).to(tl.float32)
    rmax = tl.load(RMAX + rows, mask=row_ok, other=0.0)
    return tl.where(msk, tl.exp((s - rmax[:, None]) * inv_eps), 0.0)


@triton.jit
def _sk_colsum_kernel(
    S, RMAX, CVEC, OUT, ROWS, SEG, K, ssn, ssk, inv_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """OUT[g, k] = sum_{n in g} E_nk c_n; group g's rows are ROWS[SEG[g]:SEG[g + 1]]."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    g = tl.program_id(1)
    start = tl.load(SEG + g)
    end = tl.load(SEG + g + 1)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for i0 in range(start, end, BLOCK_N):
        idx = i0 + tl.arange(0, BLOCK_N)
        ok = idx < end
        rows = tl.load(ROWS + idx, mask=ok, other=0)
        e = _sk_tile(S, RMAX, rows, ok, offs_k, K, ssn, ssk, inv_eps)
        c = tl.load(CVEC + rows, mask=ok, other=0.0)
        acc += tl.sum(e * c[:, None], 0)
    tl.store(OUT + g * K + offs_k, acc, mask=offs_k < K)


@triton.jit
def _sk_rowsum_kernel(
    S, RMAX, RVEC, OUT, GRP, N, K, ssn, ssk, inv_eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """OUT[n] = sum_k E_nk r_{g(n) k} (RVEC (G, K) contiguous, GRP (N,) the rows' groups)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs_n < N
    grp = tl.load(GRP + offs_n, mask=ok, other=0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        e = _sk_tile(S, RMAX, offs_n, ok, offs_k, K, ssn, ssk, inv_eps)
        km = ok[:, None] & (offs_k < K)[None, :]
        r = tl.load(RVEC + grp[:, None] * K + offs_k[None, :], mask=km, other=0.0)
        acc += tl.sum(e * r, 1)
    tl.store(OUT + offs_n, acc, mask=ok)


@triton.jit
def _sk_write_kernel(
    S, RMAX, RVEC, CVEC, Q, GRP, N, K, ssn, ssk, sqn, sqk, inv_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Q_nk = E_nk r_{g(n) k} c_n."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs_n < N
    e = _sk_tile(S, RMAX, offs_n, ok, offs_k, K, ssn, ssk, inv_eps)
    msk = ok[:, None] & (offs_k < K)[None, :]
    grp = tl.load(GRP + offs_n, mask=ok, other=0)
    r = tl.load(RVEC + grp[:, None] * K + offs_k[None, :], mask=msk, other=0.0)
    c = tl.load(CVEC + offs_n, mask=ok, other=0.0)
    q = e * r * c[:, None]
    tl.store(Q + offs_n[:, None] * sqn + offs_k[None, :] * sqk, q.to(Q.dtype.element_ty), mask=msk)


_SK_KERNELS = {
    "sk_colsum": _sk_colsum_kernel,
    "sk_rowsum": _sk_rowsum_kernel,
    "sk_write": _sk_write_kernel,
}


def sinkhorn_groups(groups: torch.Tensor, n_groups: int):
    """The group layout the Sinkhorn kernels read: (grp (N,) int32, rows (N,) int32 the row
    indices ordered by group, seg (n_groups + 1,) int32 offsets of each group in ``rows``)."""
    grp = groups.to(torch.int32).contiguous()
    rows = torch.argsort(groups, stable=True).to(torch.int32)
    counts = torch.bincount(groups, minlength=n_groups)
    seg = torch.zeros(n_groups + 1, dtype=torch.int32, device=groups.device)
    seg[1:] = counts.cumsum(0)
    return grp, rows, seg


def sinkhorn_call(name, scores, rmax, vec, out, inv_eps, layout, c=None) -> lc.Call:
    """One Sinkhorn launch on scores (N, K) with row maxima ``rmax`` (N,) fp32 and the group
    ``layout`` of :func:`sinkhorn_groups` (G groups): ``sk_colsum`` out (G, K) = per group
    sum_n E_nk vec_n; ``sk_rowsum`` out (N,) = sum_k E_nk vec_{g(n) k} (vec (G, K));
    ``sk_write`` out (N, K) = E_nk vec_{g(n) k} c_n in the scores' dtype."""
    n, k = scores.shape
    ss = scores.stride()
    grp, rows, seg = layout
    la = _launch(name, scores.dtype, n, k)
    bn, bk = la.get("BLOCK_N"), la.get("BLOCK_K")
    if name == "sk_colsum":
        grid = (triton.cdiv(k, bk), seg.numel() - 1)
        args = [scores, rmax, vec, out, rows, seg, k, *ss, inv_eps]
    elif name == "sk_rowsum":
        grid, args = (triton.cdiv(n, bn),), [scores, rmax, vec, out, grp, n, k, *ss, inv_eps]
    else:
        grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
        args = [scores, rmax, vec, c, out, grp, n, k, *ss, *out.stride(), inv_eps]
    return lc.Call(name, _SK_KERNELS[name], grid, args, lc.call_meta(la))


@torch.no_grad()
def sinkhorn_triton(scores, groups, n_groups, n_iters, epsilon, distributed):
    """Sinkhorn-Knopp (n_iters >= 1) with the scaling vectors of ``sinkhorn``'s docstring, per
    group of rows; exp recomputed from the scores in every pass, the (N, K) output written
    once."""
    from skysense.kernels.sinkhorn import _group_max, _group_rows

    n, k = scores.shape
    layout = sinkhorn_groups(groups, n_groups)
    inv_eps = 1.0 / epsilon
    rmax = scores.amax(dim=1).float()
    gmax = _group_max(rmax, groups, n_groups, distributed)
    c = torch.exp((rmax.double() - gmax[groups]) / epsilon).float()
    n_rows = _group_rows(groups, n_groups, distributed)[groups].float()  # (N,) N_g of each row
    tiny = torch.finfo(torch.float32).tiny
    r = torch.empty(n_groups, k, dtype=torch.float32, device=scores.device)
    for _ in range(n_iters):
        col = dispatch.new_output((n_groups, k), torch.float32, scores.device)
        sinkhorn_call("sk_colsum", scores, rmax, c, col, inv_eps, layout)()
        if distributed:
            sdist.all_reduce_sum_(col)
        r = 1.0 / (k * col).clamp_min(tiny)
        row = dispatch.new_output((n,), torch.float32, scores.device)
        sinkhorn_call("sk_rowsum", scores, rmax, r, row, inv_eps, layout)()
        c = 1.0 / (n_rows * row).clamp_min(tiny)
    q = dispatch.new_output((n, k), scores.dtype, scores.device)
    sinkhorn_call("sk_write", scores, rmax, r, q, inv_eps, layout, c=c * n_rows)()
    return q

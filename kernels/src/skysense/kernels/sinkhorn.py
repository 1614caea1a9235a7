"""Sinkhorn-Knopp with uniform marginals: (N, K) scores -> (N, K) soft assignments whose rows
sum to 1 and whose columns sum to N / K (SwAV, DINOv2's centring, the GCPL prototype step).

The reference normalises a (K, N) matrix in place, alternately over prototypes and samples. The
fused backends keep the matrix implicit as Q_nk = N r_k c_n E_nk with E = exp((S - m_n) / eps)
and only iterate the scaling vectors,

    r_k <- 1 / (K sum_n E_nk c_n),    c_n <- 1 / (N sum_k E_nk r_k),

which is the same sequence of normalisations (each one overwrites the previous scale of its
axis, so the first global normalisation drops out). Subtracting each sample's own max m_n is
absorbed by c_n (which starts at exp((m_n - max S) / eps), the reference's global shift), so
it changes nothing but the range of exp. With ``distributed`` the sums over
samples are all-reduced and N counts every rank's samples.

Backends: ``triton`` (CUDA, or forced under the interpreter: exp recomputed on the fly, the
output written once), ``chunked`` (torch: E stored once in the output buffer, matrix-vector
products), ``reference``.
"""

from __future__ import annotations

import torch

from skysense.kernels import dispatch
from skysense.kernels import distributed as sdist

OP = "sinkhorn_knopp"
BACKENDS = ("triton", "chunked", "reference")


@torch.no_grad()
def sinkhorn_knopp_reference(scores, n_iters=3, epsilon=0.05):
    """Sinkhorn-Knopp with uniform marginals: (N, K) scores -> (N, K) assignments whose rows sum
    to 1 and whose columns sum to N / K."""
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


def _n_total(scores, distributed):
    n = torch.tensor([float(scores.shape[0])], dtype=torch.float64, device=scores.device)
    if distributed:
        sdist.all_reduce_sum_(n)
    return float(n.item())


@torch.no_grad()
def _no_iterations(scores, epsilon, distributed):
    """n_iters == 0: only the global normalisation, which needs one max over every rank."""
    m = scores.max().to(torch.float64).reshape(1)
    if distributed:
        sdist.all_reduce_max_(m)
    e = torch.exp((scores.double() - m) / epsilon)
    total = e.sum().reshape(1)
    if distributed:
        sdist.all_reduce_sum_(total)
    return (e * (_n_total(scores, distributed) / total)).to(scores.dtype)


def _initial_col_scale(row_max, epsilon, distributed):
    """c_n before the first iteration: exp((m_n - M) / eps), M the max over every sample, so that
    the first normalisation over samples weighs them as the reference's global shift does."""
    m = row_max.max().to(torch.float64).reshape(1)
    if distributed:
        sdist.all_reduce_max_(m)
    return torch.exp((row_max.to(torch.float64) - m) / epsilon)


@torch.no_grad()
def _chunked(scores, n_iters, epsilon, distributed):
    cdt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    n_all = _n_total(scores, distributed)
    k = scores.shape[1]
    s = scores.to(cdt)
    row_max = s.amax(dim=1, keepdim=True)
    e = (s - row_max).div_(epsilon).exp_()  # (N, K), the only N x K buffer
    c = _initial_col_scale(row_max.reshape(-1), epsilon, distributed).to(cdt)
    r = None
    for _ in range(n_iters):
        col = sdist.all_reduce_sum_(c @ e) if distributed else c @ e  # (K,)
        r = 1.0 / (k * col)
        c = 1.0 / (n_all * (e @ r))
    e.mul_(r[None, :]).mul_((n_all * c)[:, None])
    return e.to(scores.dtype)


def _choose(scores) -> str:
    forced = dispatch.forced_backend(OP)
    ok_dtype = scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{OP}: unknown backend {forced!r}; one of {BACKENDS}")
        if forced == "triton":
            reason = dispatch.triton_unavailable_reason(scores.device)
            if reason is None and not ok_dtype:
                reason = f"the Triton kernels take fp32, fp16 or bf16, got {scores.dtype}"
            if reason:
                raise RuntimeError(f"{OP}: backend 'triton' forced but {reason}")
        return forced
    if scores.is_cuda and ok_dtype and dispatch.triton_unavailable_reason(scores.device) is None:
        return "triton"
    return "chunked"


@torch.no_grad()
def sinkhorn_knopp(scores, n_iters=3, epsilon=0.05, distributed=False):
    """Sinkhorn-Knopp assignments with uniform marginals (no gradient).

    Args:
        scores: (N, K) float (e.g. cosine similarities of N samples to K prototypes).
        n_iters: alternating normalisations (prototypes, then samples) to run.
        epsilon: entropic regularisation: Q ~ exp(scores / epsilon).
        distributed: the samples are spread over the torch.distributed ranks: sums over
            samples are all-reduced and N counts all of them (each rank gets its own rows back).

    Returns:
        (N, K) in the dtype of ``scores``: rows sum to 1 and columns to N_total / K (after at
        least one iteration). ``last_backend("sinkhorn_knopp")`` names the backend.
    """
    if scores.dim() != 2:
        raise ValueError(f"{OP}: scores must be (N, K), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"{OP}: epsilon must be > 0, got {epsilon}")
    distributed = bool(distributed) and sdist.is_distributed()
    backend = _choose(scores)
    if backend == "reference":
        if distributed:
            raise RuntimeError(f"{OP}: the reference backend is single-process (distributed=True)")
        out = sinkhorn_knopp_reference(scores, n_iters, epsilon)
    elif n_iters == 0:
        out = _no_iterations(scores, epsilon, distributed)
    elif backend == "triton":
        from skysense.kernels.triton_losses import sinkhorn_triton

        out = sinkhorn_triton(scores, n_iters, epsilon, distributed)
    else:
        out = _chunked(scores, n_iters, epsilon, distributed)
    dispatch.record(OP, backend)
    return out

"""Symmetric InfoNCE with positives on the diagonal, computed block by block.

For a (N, d) and b (N, d) and logits S = a b^T / t, the loss is

    L = 1/(2N) sum_i [ (lse_j S_ij - S_ii) + (lse_j S_ji - S_ii) ]

The fused backends never hold the N x N matrix: the forward keeps the row log-sum-exp of each
block of rows and an online (running max, running sum) log-sum-exp of every column; the backward
recomputes each block and uses dL/dS_ij = (softmax_row_ij + softmax_col_ij - 2 delta_ij) / (2N),
so memory is O(N d + block N).

With ``gather=True`` (torch.distributed) each rank keeps its own rows as queries and positives
and gathers every rank's rows as negatives: with n rows per rank,

    L_r = 1/(2n) sum_{i in r} [ lse_j (a_i . b_all_j) / t + lse_j (b_i . a_all_j) / t - 2 S_ii ]

The mean of L_r over ranks is the loss of the concatenated batch, and the gradients reaching
each rank's rows through the gather's backward (summed over ranks) are ``world`` times that
batch's gradients: DDP's averaging over ranks makes them equal.

Backends: ``triton`` (CUDA, or forced under the interpreter), ``chunked`` (any device, a
custom autograd.Function over torch blocks), ``reference`` (materialises the matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skysense.kernels import dispatch
from skysense.kernels import distributed as sdist

OP = "info_nce"
BACKENDS = ("triton", "chunked", "reference")


EXP_FLOOR = -80.0  # see prototype_loss.EXP_FLOOR: keeps exp off its slow path, changes nothing


def _row_lse(s):
    """logsumexp over dim 1 of a (rows, cols) block, destroying it."""
    m = s.amax(dim=1, keepdim=True)
    return s.sub_(m).clamp_(min=EXP_FLOOR).exp_().sum(dim=1).log_().add_(m[:, 0])


def info_nce_reference(a, b, temperature=0.1, gather=False):
    """Symmetric InfoNCE materialising the logits: (N, N), or (n, world n) with ``gather``.

    a, b: (N, d). Returns the scalar mean of the a->b and b->a cross-entropies.
    """
    if not gather or not sdist.is_distributed():
        logits = a @ b.t() / temperature
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    n = a.shape[0]
    _, rank = sdist.world_and_rank()
    a_all = sdist.all_gather_with_grad(a)
    b_all = sdist.all_gather_with_grad(b)
    target = torch.arange(n, device=a.device) + rank * n
    la = F.cross_entropy(a @ b_all.t() / temperature, target)
    lb = F.cross_entropy(b @ a_all.t() / temperature, target)
    return 0.5 * (la + lb)


# --- the chunked (torch) engine --------------------------------------------------------------


def _rows_per_block(n_cols: int, n_rows: int | None = None) -> int:
    n_rows = n_cols if n_rows is None else n_rows
    return max(1, dispatch.slab_elems(n_rows * n_cols) // max(1, n_cols))


class ChunkedEngine:
    """Block-by-block torch implementation of the four primitives of the fused loss."""

    name = "chunked"

    @staticmethod
    def lse_both(a, b, inv_t):
        """Row and column log-sum-exp of a b^T * inv_t in one pass: ((N,), (N,))."""
        n = a.shape[0]
        lse_r = torch.empty(n, dtype=a.dtype, device=a.device)
        cmax = torch.full((b.shape[0],), float("-inf"), dtype=a.dtype, device=a.device)
        csum = torch.zeros(b.shape[0], dtype=a.dtype, device=a.device)
        step = _rows_per_block(b.shape[0], n)
        for i in range(0, n, step):
            s = (a[i : i + step] @ b.t()).mul_(inv_t)
            new_max = torch.maximum(cmax, s.amax(dim=0))
            col = torch.sub(s, new_max).clamp_(min=EXP_FLOOR).exp_().sum(dim=0)
            csum.mul_(torch.exp(cmax - new_max)).add_(col)
            cmax = new_max
            lse_r[i : i + step] = _row_lse(s)
        return lse_r, cmax + torch.log(csum)

    @staticmethod
    def lse_rows(x, y, inv_t):
        """Row log-sum-exp of x y^T * inv_t: (n,)."""
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        step = _rows_per_block(y.shape[0], x.shape[0])
        for i in range(0, x.shape[0], step):
            out[i : i + step] = _row_lse((x[i : i + step] @ y.t()).mul_(inv_t))
        return out

    @staticmethod
    def grad_both(a, b, lse_r, lse_c, inv_t):
        """(G a-side, G b-side) with G = exp(S - lse_r) + exp(S - lse_c): (G b, G^T a)."""
        da = torch.empty_like(a)
        db = torch.zeros_like(b)
        step = _rows_per_block(b.shape[0], a.shape[0])
        for i in range(0, a.shape[0], step):
            s = (a[i : i + step] @ b.t()).mul_(inv_t)
            g = torch.sub(s, lse_r[i : i + step, None]).clamp_(min=EXP_FLOOR).exp_()
            g += s.sub_(lse_c[None, :]).clamp_(min=EXP_FLOOR).exp_()
            da[i : i + step] = g @ b
            db.addmm_(g.t(), a[i : i + step])
        return da, db

    @staticmethod
    def grad_rows(x, y, lse_x, lse_y, inv_t):
        """G y with G = [exp(S - lse_x_i)] + [exp(S - lse_y_j)], S = x y^T * inv_t; a term is
        left out where its lse is None."""
        dx = torch.empty_like(x)
        step = _rows_per_block(y.shape[0], x.shape[0])
        for i in range(0, x.shape[0], step):
            s = (x[i : i + step] @ y.t()).mul_(inv_t)
            g = torch.zeros_like(s)
            if lse_x is not None:
                g += torch.sub(s, lse_x[i : i + step, None]).clamp_(min=EXP_FLOOR).exp_()
            if lse_y is not None:
                g += torch.sub(s, lse_y[None, :]).clamp_(min=EXP_FLOOR).exp_()
            dx[i : i + step] = g @ y
        return dx


def _engine(name):
    if name == "triton":
        from skysense.kernels.triton_losses import TritonInfoNCEEngine

        return TritonInfoNCEEngine
    return ChunkedEngine


def _compute_dtype(x: torch.Tensor, engine_name: str) -> torch.dtype:
    if engine_name == "triton":
        return x.dtype  # the kernels accumulate in fp32 whatever they read
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class InfoNCEFunction(torch.autograd.Function):
    """``apply(a, b, temperature, gather, engine_name)`` -> scalar; see the module docstring."""

    @staticmethod
    def forward(ctx, a, b, temperature, gather, engine_name):
        with dispatch.no_autocast(a):
            return InfoNCEFunction._forward(ctx, a, b, temperature, gather, engine_name)

    @staticmethod
    def backward(ctx, g):
        with dispatch.no_autocast(g):
            return InfoNCEFunction._backward(ctx, g)

    @staticmethod
    def _forward(ctx, a, b, temperature, gather, engine_name):
        eng = _engine(engine_name)
        cdt = _compute_dtype(a, engine_name)
        ac, bc = a.detach().to(cdt).contiguous(), b.detach().to(cdt).contiguous()
        inv_t = 1.0 / temperature
        n = ac.shape[0]
        diag = (ac.float() * bc.float()).sum(1) if cdt != torch.float64 else (ac * bc).sum(1)
        diag = diag * inv_t
        gather = gather and sdist.is_distributed()
        if gather:
            sdist.check_same_rows(ac, "info_nce(gather=True)")
            a_all, b_all = sdist.all_gather_rows(ac), sdist.all_gather_rows(bc)
            lse_a = eng.lse_rows(ac, b_all, inv_t)
            lse_b = eng.lse_rows(bc, a_all, inv_t)
            ctx.save_for_backward(ac, bc, a_all, b_all, lse_a, lse_b)
        else:
            lse_a, lse_b = eng.lse_both(ac, bc, inv_t)
            ctx.save_for_backward(ac, bc, lse_a, lse_b)
        ctx.meta = (engine_name, inv_t, gather, a.dtype, b.dtype)
        loss = (lse_a.to(diag.dtype).sum() + lse_b.to(diag.dtype).sum() - 2 * diag.sum()) / (2 * n)
        return loss.to(torch.float64 if cdt == torch.float64 else torch.float32)

    @staticmethod
    def _backward(ctx, g):
        engine_name, inv_t, gather, adt, bdt = ctx.meta
        eng = _engine(engine_name)
        if gather:
            ac, bc, a_all, b_all, lse_a, lse_b = ctx.saved_tensors
            da = eng.grad_rows(ac, b_all, lse_a, None, inv_t)
            db = eng.grad_rows(bc, a_all, lse_b, None, inv_t)
            # Our rows as other ranks' negatives (and our own): sum over ranks, keep our slice.
            da_all = sdist.all_reduce_sum_(eng.grad_rows(a_all, bc, None, lse_b, inv_t))
            db_all = sdist.all_reduce_sum_(eng.grad_rows(b_all, ac, None, lse_a, inv_t))
            n = ac.shape[0]
            da = da + sdist.rank_slice(da_all, n)
            db = db + sdist.rank_slice(db_all, n)
        else:
            ac, bc, lse_a, lse_b = ctx.saved_tensors
            da, db = eng.grad_both(ac, bc, lse_a, lse_b, inv_t)
        n = ac.shape[0]
        da = (da.float() if da.dtype != torch.float64 else da) - 2 * bc.to(da.dtype)
        db = (db.float() if db.dtype != torch.float64 else db) - 2 * ac.to(db.dtype)
        coef = g.to(da.dtype) * (inv_t / (2 * n))
        return (da * coef).to(adt), (db * coef).to(bdt), None, None, None


def _choose(a) -> str:
    triton = lambda: dispatch.triton_reason(a)  # noqa: E731
    auto = ("triton",) if a.is_cuda else ()
    return dispatch.choose(OP, BACKENDS, {"triton": triton}, auto, "chunked")


def info_nce(a, b, temperature=0.1, gather=False):
    """Symmetric InfoNCE between two (N, d) embedding sets; row i of ``a`` and of ``b`` are a
    positive pair, every other row of the other set a negative.

    Args:
        a, b: (N, d) float tensors (fp32/fp16/bf16; float64 on the chunked and reference
            backends), same shape and device.
        temperature: divides the dot products (embeddings are usually L2-normalised first).
        gather: gather the other processes' rows as negatives (torch.distributed all-gather,
            gradients through it); each rank's positives stay its own rows. See the module
            docstring for how the per-rank losses relate to the concatenated batch's.

    Returns:
        Scalar float32 (float64 for float64 input). The fused backends never store the N x N
        logits (memory O(N d)). ``last_backend("info_nce")`` names the backend that ran.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"info_nce: a and b must both be (N, d); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"info_nce: a is on {a.device}, b on {b.device}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    backend = _choose(a)
    if backend == "reference":
        out = info_nce_reference(a, b, temperature, gather)
    else:
        out = InfoNCEFunction.apply(a, b, float(temperature), bool(gather), backend)
    dispatch.record(OP, backend)
    return out

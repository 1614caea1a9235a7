"""DINO-style soft-target cross-entropy over K prototypes with the last linear layer fused in.

    L = 1/N sum_i H( softmax((teacher_x_i Wt^T - center) / t_t), log_softmax(student_x_i W^T / t_s) )
      = 1/N sum_i [ lse_k(s_ik) - sum_k p_ik s_ik ],   s = student_x W^T / t_s

The fused backends walk over blocks of prototypes keeping, per sample, online log-sum-exps of
the student and teacher logits and the running teacher-weighted sum of student logits (rescaled
when the teacher's running max moves), so the (N, K) logits are never stored (K = 65536 is
normal). The backward recomputes each block: d L / d s_ik = (softmax(s)_ik - p_ik) / N.
Gradients flow to ``student_x`` and ``weight``; the teacher side is a constant.

Backends: ``triton`` (CUDA, or forced under the interpreter), ``chunked`` (any device),
``reference`` (materialises (N, K)).
"""

from __future__ import annotations

import torch

from skysense.kernels import dispatch

OP = "prototype_cross_entropy"
BACKENDS = ("triton", "chunked", "reference")


# exp(x) for x below this is < 2e-35 next to a row maximum of exp(0) = 1: flooring the argument
# changes no sum or gradient at float64 precision, and keeps torch's exp off its slow path for
# very negative inputs (5-10x slower on this CPU; the teacher's 1/0.04 makes them common).
EXP_FLOOR = -80.0


def prototype_cross_entropy_reference(
    student_x,
    teacher_x,
    weight,
    teacher_weight=None,
    center=None,
    student_temp=0.1,
    teacher_temp=0.04,
):
    """H(softmax((teacher_x Wt^T - center) / t_t), log_softmax(student_x W^T / t_s)), mean over N.

    student_x, teacher_x: (N, d); weight, teacher_weight: (K, d); center: (K,) or None.
    Materialises the (N, K) logits; the teacher side carries no gradient.
    """
    with torch.no_grad():
        tw = weight if teacher_weight is None else teacher_weight
        t = teacher_x @ tw.t()
        if center is not None:
            t = t - center
        p = torch.softmax(t / teacher_temp, dim=-1)
    logq = torch.log_softmax(student_x @ weight.t() / student_temp, dim=-1)
    return -(p * logq).sum(-1).mean()


class ChunkedEngine:
    """Torch blocks over K with the online statistics of the module docstring."""

    name = "chunked"

    @staticmethod
    def forward(sx, tx, w, tw, center, inv_ts, inv_tt):
        """Per-sample (loss, lse_student, lse_teacher), each (N,)."""
        n, k_total = sx.shape[0], w.shape[0]
        dt, dev = sx.dtype, sx.device
        ms = torch.full((n,), float("-inf"), dtype=dt, device=dev)
        ls = torch.zeros(n, dtype=dt, device=dev)
        mt = torch.full((n,), float("-inf"), dtype=dt, device=dev)
        lt = torch.zeros(n, dtype=dt, device=dev)
        acc = torch.zeros(n, dtype=dt, device=dev)  # sum_k exp(t_k - mt) * s_k
        step = max(1, dispatch.slab_elems(n * k_total) // max(1, n))
        for k0 in range(0, k_total, step):
            s = (sx @ w[k0 : k0 + step].t()).mul_(inv_ts)
            t = tx @ tw[k0 : k0 + step].t()
            if center is not None:
                t -= center[k0 : k0 + step]
            t.mul_(inv_tt)
            new_ms = torch.maximum(ms, s.amax(1))
            e = torch.sub(s, new_ms[:, None]).clamp_(min=EXP_FLOOR).exp_()
            ls = ls * torch.exp(ms - new_ms) + e.sum(1)
            ms = new_ms
            new_mt = torch.maximum(mt, t.amax(1))
            alpha = torch.exp(mt - new_mt)
            e = t.sub_(new_mt[:, None]).clamp_(min=EXP_FLOOR).exp_()
            lt = lt * alpha + e.sum(1)
            acc = acc * alpha + e.mul_(s).sum(1)
            mt = new_mt
        lse_s = ms + torch.log(ls)
        lse_t = mt + torch.log(lt)
        return lse_s - acc / lt, lse_s, lse_t

    @staticmethod
    def backward(sx, tx, w, tw, center, inv_ts, inv_tt, lse_s, lse_t):
        """(G w, G^T sx) with G = softmax(s) - p, (N, K) never stored."""
        n, k_total = sx.shape[0], w.shape[0]
        dsx = torch.zeros_like(sx)
        dw = torch.empty_like(w)
        step = max(1, dispatch.slab_elems(n * k_total) // max(1, n))
        for k0 in range(0, k_total, step):
            wk = w[k0 : k0 + step]
            s = (sx @ wk.t()).mul_(inv_ts)
            t = tx @ tw[k0 : k0 + step].t()
            if center is not None:
                t -= center[k0 : k0 + step]
            g = s.sub_(lse_s[:, None]).clamp_(min=EXP_FLOOR).exp_()
            g -= t.mul_(inv_tt).sub_(lse_t[:, None]).clamp_(min=EXP_FLOOR).exp_()
            dsx.addmm_(g, wk)
            dw[k0 : k0 + step] = g.t() @ sx
        return dsx, dw


def _engine(name):
    if name == "triton":
        from skysense.kernels.triton_losses import TritonPrototypeEngine

        return TritonPrototypeEngine
    return ChunkedEngine


class PrototypeCrossEntropyFunction(torch.autograd.Function):
    """``apply(student_x, weight, teacher_x, teacher_weight, center, t_s, t_t, engine_name)``."""

    @staticmethod
    def forward(ctx, sx, w, tx, tw, center, student_temp, teacher_temp, engine_name):
        with dispatch.no_autocast(sx):
            return PrototypeCrossEntropyFunction._forward(
                ctx, sx, w, tx, tw, center, student_temp, teacher_temp, engine_name
            )

    @staticmethod
    def backward(ctx, g):
        with dispatch.no_autocast(g):
            return PrototypeCrossEntropyFunction._backward(ctx, g)

    @staticmethod
    def _forward(ctx, sx, w, tx, tw, center, student_temp, teacher_temp, engine_name):
        eng = _engine(engine_name)
        if engine_name == "triton":
            cdt = sx.dtype
        else:
            cdt = torch.float64 if sx.dtype == torch.float64 else torch.float32
        sxc, wc = sx.detach().to(cdt).contiguous(), w.detach().to(cdt).contiguous()
        txc = tx.detach().to(cdt).contiguous()
        twc = wc if tw is None else tw.detach().to(cdt).contiguous()
        cc = (
            None
            if center is None
            else center.detach()
            .to(torch.float32 if cdt != torch.float64 else cdt)
            .reshape(-1)
            .contiguous()
        )
        inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
        loss_rows, lse_s, lse_t = eng.forward(sxc, txc, wc, twc, cc, inv_ts, inv_tt)
        ctx.save_for_backward(sxc, wc, txc, twc, cc, lse_s, lse_t)
        ctx.meta = (engine_name, inv_ts, inv_tt, sx.dtype, w.dtype)
        out_dt = torch.float64 if cdt == torch.float64 else torch.float32
        return loss_rows.to(out_dt).mean()

    @staticmethod
    def _backward(ctx, g):
        engine_name, inv_ts, inv_tt, sdt, wdt = ctx.meta
        sxc, wc, txc, twc, cc, lse_s, lse_t = ctx.saved_tensors
        dsx = dw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dsx, dw = _engine(engine_name).backward(
                sxc, txc, wc, twc, cc, inv_ts, inv_tt, lse_s, lse_t
            )
            coef = g * (inv_ts / sxc.shape[0])
            dsx = (dsx.to(coef.dtype) * coef).to(sdt)
            dw = (dw.to(coef.dtype) * coef).to(wdt)
        return dsx, dw, None, None, None, None, None, None


def _choose(x) -> str:
    triton = lambda: dispatch.triton_reason(x)  # noqa: E731
    auto = ("triton",) if x.is_cuda else ()
    return dispatch.choose(OP, BACKENDS, {"triton": triton}, auto, "chunked")


def prototype_cross_entropy(
    student_x,
    teacher_x,
    weight,
    teacher_weight=None,
    center=None,
    student_temp=0.1,
    teacher_temp=0.04,
):
    """DINO-style soft-target cross-entropy over K prototypes with the last linear layer fused.

    Args:
        student_x, teacher_x: (N, d) features before the prototype layer (same dtype/device).
        weight: (K, d) the student's prototype layer (W, no bias); gets a gradient.
        teacher_weight: (K, d) the teacher's (EMA) prototype layer, or None to use ``weight``
            (as a constant on the teacher side).
        center: (K,) the teacher centre subtracted from the teacher logits, or None.
        student_temp, teacher_temp: t_s and t_t.

    Returns:
        Scalar float32 (float64 for float64 input): the mean over N of
        H(softmax((teacher_x Wt^T - center)/t_t), log_softmax(student_x W^T / t_s)). Gradients
        flow to ``student_x`` and ``weight`` only. The fused backends never store (N, K).
    """
    if student_x.dim() != 2 or student_x.shape != teacher_x.shape:
        raise ValueError(
            f"{OP}: student_x and teacher_x must both be (N, d); got {tuple(student_x.shape)} "
            f"and {tuple(teacher_x.shape)}"
        )
    d = student_x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{OP}: weight must be (K, d={d}), got {tuple(weight.shape)}")
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(
            f"{OP}: teacher_weight {tuple(teacher_weight.shape)} must match weight "
            f"{tuple(weight.shape)}"
        )
    if center is not None and center.numel() != weight.shape[0]:
        raise ValueError(
            f"{OP}: center must hold K={weight.shape[0]} values, got shape {tuple(center.shape)}"
        )
    backend = _choose(student_x)
    if backend == "reference":
        out = prototype_cross_entropy_reference(
            student_x, teacher_x, weight, teacher_weight, center, student_temp, teacher_temp
        )
    else:
        out = PrototypeCrossEntropyFunction.apply(
            student_x, weight, teacher_x, teacher_weight, center,
            float(student_temp), float(teacher_temp), backend,
        )  # fmt: skip
    dispatch.record(OP, backend)
    return out


@torch.no_grad()
def prototype_center_update(teacher_x, center, teacher_weight, momentum=0.9) -> torch.Tensor:
    """EMA of the teacher centre, in place: center <- m center + (1 - m) mean_n(teacher_x Wt^T).

    The mean of the teacher logits over samples is (mean_n teacher_x) Wt^T (the layer is
    linear), so this costs O(N d + K d) and never forms (N, K). Across processes, reduce the
    sums of teacher_x and pass their global mean as one row (``TeacherCentering`` does, for
    every logit set in one all-reduce).

    Args:
        teacher_x: (N, d); center: (K,) or (1, K) float tensor, updated in place;
        teacher_weight: (K, d); momentum: m.

    Returns:
        ``center``.
    """
    if (
        teacher_x.dim() != 2
        or teacher_weight.dim() != 2
        or teacher_x.shape[1] != teacher_weight.shape[1]
    ):
        raise ValueError(
            f"prototype_center_update: teacher_x (N, d) and teacher_weight (K, d) must share d; "
            f"got {tuple(teacher_x.shape)} and {tuple(teacher_weight.shape)}"
        )
    if center.numel() != teacher_weight.shape[0]:
        raise ValueError(
            f"prototype_center_update: center must hold K={teacher_weight.shape[0]} values, "
            f"got shape {tuple(center.shape)}"
        )
    acc_dt = torch.float64 if teacher_x.dtype == torch.float64 else torch.float32
    total = torch.cat(
        [
            teacher_x.to(acc_dt).sum(0),
            torch.tensor([teacher_x.shape[0]], dtype=acc_dt, device=teacher_x.device),
        ]
    )
    mean_x = total[:-1] / total[-1]
    batch_center = teacher_weight.to(acc_dt) @ mean_x  # (K,)
    center.mul_(momentum).add_(
        batch_center.reshape(center.shape).to(center.dtype), alpha=1 - momentum
    )
    return center

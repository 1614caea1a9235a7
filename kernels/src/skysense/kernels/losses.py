"""Contrastive and distillation losses (public ops). Reference implementations for now; the
fused block-wise backends (Triton on CUDA, C++/chunked on the CPU) land with the kernels issue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skysense.kernels import dispatch


def info_nce_reference(a, b, temperature=0.1):
    """Symmetric InfoNCE with positives on the diagonal, materialising the (N, N) logits.

    a, b: (N, d). Returns the scalar mean of the a->b and b->a cross-entropies.
    """
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def info_nce(a, b, temperature=0.1, gather=False):
    """Symmetric InfoNCE between two (N, d) embedding sets; row i of ``a`` and of ``b`` are a
    positive pair, every other row of the other set a negative. Returns a scalar (float32)."""
    if gather:
        raise NotImplementedError("info_nce(gather=True) lands with the kernels issue")
    dispatch.record("info_nce", "reference")
    return info_nce_reference(a, b, temperature)


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
    """
    tw = weight if teacher_weight is None else teacher_weight
    t = teacher_x @ tw.t()
    if center is not None:
        t = t - center
    p = torch.softmax(t / teacher_temp, dim=-1)
    logq = torch.log_softmax(student_x @ weight.t() / student_temp, dim=-1)
    return -(p * logq).sum(-1).mean()


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

    See :func:`prototype_cross_entropy_reference` for the formula. Gradients flow to
    ``student_x`` and ``weight``; the teacher side is treated as constant.
    """
    dispatch.record("prototype_cross_entropy", "reference")
    with torch.no_grad():
        tw = weight if teacher_weight is None else teacher_weight
        t = teacher_x @ tw.t()
        if center is not None:
            t = t - center
        p = torch.softmax(t / teacher_temp, dim=-1)
    logq = torch.log_softmax(student_x @ weight.t() / student_temp, dim=-1)
    return -(p * logq).sum(-1).mean()


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


def sinkhorn_knopp(scores, n_iters=3, epsilon=0.05, distributed=False):
    """Sinkhorn-Knopp assignments with uniform marginals for (N, K) scores (no gradient)."""
    if distributed:
        raise NotImplementedError("sinkhorn_knopp(distributed=True) lands with the kernels issue")
    dispatch.record("sinkhorn_knopp", "reference")
    return sinkhorn_knopp_reference(scores, n_iters, epsilon)

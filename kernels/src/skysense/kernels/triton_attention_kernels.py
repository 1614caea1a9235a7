"""The Triton kernels of fused attention: the forward (online softmax over key blocks, saving
the log-sum-exp per query) and the two backward kernels (dk, dv and the bias gradients over key
blocks; dq over query blocks). Launched by ``triton_attention``, whose docstring describes the
maths, the biases and the padding; their launch configurations are in ``launch_configs``.

Only imported when a Triton backend is asked for (importing triton is slow and must follow
``TRITON_INTERPRET``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from skysense.kernels.triton_common import _dot


@triton.jit
def _bias_tile(ptr, b, h, offs_m, offs_n, Nq, Nk, bb, sb, sh, sm, sn):
    p = ptr + (b % bb) * sb + h * sh + offs_m[:, None] * sm + offs_n[None, :] * sn
    msk = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    return tl.load(p, mask=msk, other=0.0).to(tl.float32)


@triton.jit
def _tile(X, b, h, offs_r, offs_d, sb, sh, sr, sd, mask):
    """The (rows, BLOCK_D) tile X[b, h, offs_r, offs_d], 0 outside ``mask``."""
    return tl.load(
        X + b * sb + h * sh + offs_r[:, None] * sr + offs_d[None, :] * sd, mask=mask, other=0.0
    )


@triton.jit
def _scores(
    q,
    kT,
    b,
    h,
    offs_m,
    offs_n,
    Nq,
    Nk,
    qk_scale,
    B0,
    b0_bb,
    b0_sb,
    b0_sh,
    b0_sm,
    b0_sn,
    B1,
    b1_bb,
    b1_sb,
    b1_sh,
    b1_sm,
    b1_sn,
    MASK,
    smb,
    smn,
    HAS_B0: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FP32: tl.constexpr,
    PREC: tl.constexpr,
):
    """Scores in log2 units, -inf on padded or out-of-range keys: (BLOCK_M, BLOCK_N) fp32."""
    s = _dot(q, kT, FP32, PREC) * qk_scale
    if HAS_B0:
        s += (
            _bias_tile(B0, b, h, offs_m, offs_n, Nq, Nk, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn)
            * 1.4426950408889634
        )
    if HAS_B1:
        s += (
            _bias_tile(B1, b, h, offs_m, offs_n, Nq, Nk, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn)
            * 1.4426950408889634
        )
    keep = offs_n < Nk
    if HAS_MASK:
        pad = tl.load(MASK + b * smb + offs_n * smn, mask=keep, other=1)
        keep = keep & (pad == 0)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
    B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
    MASK, smb, smn,
    H, Nq, Nk, D, qk_scale,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # B * H on axis 0: axis 1 is capped at 65535 on CUDA
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, (offs_m[:, None] < Nq) & dmask[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        nmask = offs_n < Nk
        kT = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=nmask[None, :] & dmask[:, None],
            other=0.0,
        )
        s = _scores(
            q, kT, b, h, offs_m, offs_n, Nq, Nk, qk_scale,
            B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
            B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
            MASK, smb, smn, HAS_B0, HAS_B1, HAS_MASK, FP32, PREC,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no unmasked key yet has m = -inf: shift by 0 instead (avoids -inf - -inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b, h, offs_n, offs_d, svb, svh, svn, svd, nmask[:, None] & dmask[None, :])
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32, PREC)
        m_i = m_new
    empty = l_i == 0.0  # every key masked: output zeros, lse +inf (probabilities 0 in backward)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    mmask = offs_m < Nq
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )
    tl.store(LSE + bh * Nq + offs_m, lse, mask=mmask)


@triton.jit
def _acc_dbias(
    DB, ds, b, h, offs_m, offs_n, Nq, Nk, bb, sb, sh, sm, sn,
    RED_M: tl.constexpr, RED_N: tl.constexpr,
):  # fmt: skip
    base = DB + (b % bb) * sb + h * sh
    mm = offs_m < Nq
    nn = offs_n < Nk
    if RED_M and RED_N:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))
    elif RED_M:
        tl.atomic_add(base + offs_n * sn, tl.sum(ds, 0), mask=nn)
    elif RED_N:
        tl.atomic_add(base + offs_m * sm, tl.sum(ds, 1), mask=mm)
    else:
        tl.atomic_add(
            base + offs_m[:, None] * sm + offs_n[None, :] * sn,
            ds,
            mask=mm[:, None] & nn[None, :],
        )


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
    B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
    DB0, db0_sb, db0_sh, db0_sm, db0_sn,
    DB1, db1_sb, db1_sh, db1_sm, db1_sn,
    MASK, smb, smn,
    H, Nq, Nk, D, qk_scale, sm_scale,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_MASK: tl.constexpr,
    GRAD_B0: tl.constexpr, GRAD_B1: tl.constexpr,
    RED0_M: tl.constexpr, RED0_N: tl.constexpr, RED1_M: tl.constexpr, RED1_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    dmask = offs_d < D
    nmask = offs_n < Nk
    kv_mask = nmask[:, None] & dmask[None, :]
    k = _tile(K, b, h, offs_n, offs_d, skb, skh, skn, skd, kv_mask)
    v = _tile(V, b, h, offs_n, offs_d, svb, svh, svn, svd, kv_mask)
    kT = tl.trans(k)
    vT = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + offs_m0
        mmask = offs_m < Nq
        qd_mask = mmask[:, None] & dmask[None, :]
        q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, qd_mask)
        do = _tile(DO, b, h, offs_m, offs_d, sdob, sdoh, sdom, sdod, qd_mask)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=mmask, other=float("inf"))
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=mmask, other=0.0)
        s = _scores(
            q, kT, b, h, offs_m, offs_n, Nq, Nk, qk_scale,
            B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
            B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
            MASK, smb, smn, HAS_B0, HAS_B1, HAS_MASK, FP32, PREC,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, FP32, PREC)
        dp = _dot(do, vT, FP32, PREC)
        ds = p * (dp - delta[:, None])  # d loss / d (scale q.k + bias)
        if GRAD_B0:
            _acc_dbias(
                DB0, ds, b, h, offs_m, offs_n, Nq, Nk, b0_bb, db0_sb,
                db0_sh, db0_sm, db0_sn, RED0_M, RED0_N,
            )  # fmt: skip
        if GRAD_B1:
            _acc_dbias(
                DB1, ds, b, h, offs_m, offs_n, Nq, Nk, b1_bb, db1_sb,
                db1_sh, db1_sm, db1_sn, RED1_M, RED1_N,
            )  # fmt: skip
        dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32, PREC)
    dk *= sm_scale
    out_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
    B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
    MASK, smb, smn,
    H, Nq, Nk, D, qk_scale, sm_scale,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # B * H on axis 0: axis 1 is capped at 65535 on CUDA
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    mmask = offs_m < Nq
    qd_mask = mmask[:, None] & dmask[None, :]
    q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, qd_mask)
    do = _tile(DO, b, h, offs_m, offs_d, sdob, sdoh, sdom, sdod, qd_mask)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < Nk)[:, None] & dmask[None, :]
        k = _tile(K, b, h, offs_n, offs_d, skb, skh, skn, skd, kv_mask)
        v = _tile(V, b, h, offs_n, offs_d, svb, svh, svn, svd, kv_mask)
        s = _scores(
            q, tl.trans(k), b, h, offs_m, offs_n, Nq, Nk, qk_scale,
            B0, b0_bb, b0_sb, b0_sh, b0_sm, b0_sn,
            B1, b1_bb, b1_sb, b1_sh, b1_sm, b1_sn,
            MASK, smb, smn, HAS_B0, HAS_B1, HAS_MASK, FP32, PREC,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), FP32, PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32, PREC)
    dq *= sm_scale
    tl.store(
        DQ + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )

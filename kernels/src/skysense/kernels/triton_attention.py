"""Fused attention in Triton: forward and backward (dq, dk, dv, dbias) with additive biases read
through their strides and a key padding mask.

The forward keeps, per block of queries, a running max and sum of exp (the online softmax) over
blocks of keys, so the (N, N) scores are never stored; it saves the log-sum-exp per query for the
backward, which recomputes the probabilities block by block (one kernel for dk, dv and dbias over
key blocks, one for dq over query blocks). Head dims that are not powers of two (Swin-H's 44) are
padded to the next power of two inside the kernel with masked loads.

Biases: up to two tensors, each a 4-d view broadcastable to (B, H, Nq, Nk); a broadcast dim has
stride 0 and a leading dim Bb that divides B is applied periodically (batch b reads bias[b % Bb],
Swin's shift mask for B * nW windows laid out image-major). Their gradient is reduced to each
bias's own shape with fp32 atomics.

Only imported when a Triton backend is asked for (importing triton is slow and must follow
``TRITON_INTERPRET``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from skysense.kernels import dispatch
from skysense.kernels import launch_configs as lc

LOG2E = 1.4426950408889634
MAX_BIASES = 2
MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, FP32: tl.constexpr, PREC: tl.constexpr):
    # Under the interpreter half-precision dots are wrong (bf16) or accumulate in fp16 through
    # numpy: FP32 upcasts the operands there, which is what the GPU's fp32 accumulation computes.
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _bias_tile(ptr, b, h, offs_m, offs_n, Nq, Nk, bb, sb, sh, sm, sn):
    p = ptr + (b % bb) * sb + h * sh + offs_m[:, None] * sm + offs_n[None, :] * sn
    msk = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    return tl.load(p, mask=msk, other=0.0).to(tl.float32)


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
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < Nq) & dmask[None, :],
        other=0.0,
    )
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
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            mask=nmask[:, None] & dmask[None, :],
            other=0.0,
        )
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
    k = tl.load(
        K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
        mask=kv_mask,
        other=0.0,
    )
    kT = tl.trans(k)
    vT = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + offs_m0
        mmask = offs_m < Nq
        qd_mask = mmask[:, None] & dmask[None, :]
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=qd_mask,
            other=0.0,
        )
        do = tl.load(
            DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
            mask=qd_mask,
            other=0.0,
        )
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
                DB0,
                ds,
                b,
                h,
                offs_m,
                offs_n,
                Nq,
                Nk,
                b0_bb,
                db0_sb,
                db0_sh,
                db0_sm,
                db0_sn,
                RED0_M,
                RED0_N,
            )
        if GRAD_B1:
            _acc_dbias(
                DB1,
                ds,
                b,
                h,
                offs_m,
                offs_n,
                Nq,
                Nk,
                b1_bb,
                db1_sb,
                db1_sh,
                db1_sm,
                db1_sn,
                RED1_M,
                RED1_N,
            )
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
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=qd_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
        mask=qd_mask,
        other=0.0,
    )
    lse = tl.load(LSE + bh * Nq + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < Nk)[:, None] & dmask[None, :]
        k = tl.load(
            K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            mask=kv_mask,
            other=0.0,
        )
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


# --- launcher ------------------------------------------------------------------------------------


@dataclass
class BiasSpec:
    """One additive bias as the kernels read it: a 4-d view with stride 0 on broadcast dims."""

    tensor: torch.Tensor  # the caller's tensor (for its shape and grad)
    view: torch.Tensor  # 4-d (Bb|1, H|1, Nq|1, Nk|1) view of it
    bb: int  # period over the batch (1 = broadcast)
    strides: tuple[int, int, int, int]  # element strides, 0 on broadcast dims
    grad_shape: tuple[int, int, int, int]  # the reduced shape its gradient is accumulated in

    @property
    def red_m(self) -> bool:
        return self.grad_shape[2] == 1

    @property
    def red_n(self) -> bool:
        return self.grad_shape[3] == 1


def bias_spec(bias: torch.Tensor, index: int, B: int, H: int, Nq: int, Nk: int) -> BiasSpec:
    """Check one bias against (B, H, Nq, Nk) and describe how the kernels read it."""
    if not bias.is_floating_point():
        raise TypeError(f"attention: bias[{index}] must be a float tensor, got {bias.dtype}")
    if bias.dim() > 4:
        raise ValueError(f"attention: bias[{index}] has {bias.dim()} dims (at most 4)")
    view = bias[(None,) * (4 - bias.dim())]
    target = (B, H, Nq, Nk)
    strides, gshape = [], []
    bb = 1
    for d, (size, st, want) in enumerate(zip(view.shape, view.stride(), target)):
        if size == 1 or st == 0:
            strides.append(0)
            gshape.append(1)
        elif size == want or (d == 0 and want % size == 0):
            strides.append(st)
            gshape.append(size)
            if d == 0:
                bb = size
        else:
            rule = " (or a divisor of B, applied periodically)" if d == 0 else ""
            raise ValueError(
                f"attention: bias[{index}] of shape {tuple(bias.shape)} does not broadcast to "
                f"(B, H, Nq, Nk) = {target}: dim {d} has {size}, expected 1 or {want}{rule}"
            )
    return BiasSpec(bias, view, bb, tuple(strides), tuple(gshape))


def _launch(kernel: str, D: int, dtype: torch.dtype, Nq: int, Nk: int) -> lc.Launch:
    """The launch of ``kernel`` (a key of ``launch_configs.ATTENTION``) for these inputs."""
    if dispatch.interpreting() and not lc.gpu_blocks_forced():
        # The interpreter pays per program and per loop step: few, large blocks.
        return lc.Launch(
            (
                ("BLOCK_M", lc.clamp(lc.INTERPRETER_BLOCK, Nq)),
                ("BLOCK_N", lc.clamp(lc.INTERPRETER_BLOCK, Nk)),
                ("BLOCK_D", lc.head_block(D)),
            ),
            4,
            1,
        )
    return lc.attention_launch(kernel, D, str(dtype).removeprefix("torch."), Nq, Nk)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not dispatch.interpreting():
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"


def _bias_args(specs: list[BiasSpec], q: torch.Tensor) -> list:
    args = []
    for i in range(MAX_BIASES):
        if i < len(specs):
            s = specs[i]
            args += [s.view, s.bb, *s.strides]
        else:
            args += [q, 1, 0, 0, 0, 0]
    return args


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> list:
    if mask is None:
        return [q, 0, 0]
    m = mask.view(torch.uint8)
    return [m, m.stride(0), m.stride(1)]


def forward_call(q, k, v, o, lse, specs, mask, scale) -> lc.Call:
    """The forward launch writing ``o`` (B, H, Nq, D) and ``lse`` (B, H, Nq) fp32."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    launch = _launch("attn_fwd", D, q.dtype, Nq, Nk)
    args = [
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *_bias_args(specs, q),
        *_mask_args(mask, q),
        H, Nq, Nk, D, scale * LOG2E,
    ]  # fmt: skip
    meta = lc.call_meta(
        launch,
        HAS_B0=len(specs) > 0, HAS_B1=len(specs) > 1, HAS_MASK=mask is not None,
        FP32=_dot_fp32(q.dtype), PREC=_precision(q.dtype),
    )  # fmt: skip
    grid = (B * H, triton.cdiv(Nq, launch.get("BLOCK_M")))
    return lc.Call("attn_fwd", _attn_fwd_kernel, grid, args, meta)


def _flash_forward(q, k, v, specs, mask, scale):
    B, H, Nq, D = q.shape
    o = dispatch.new_output((B, H, Nq, D), q.dtype, q.device)
    lse = dispatch.new_output((B, H, Nq), torch.float32, q.device)
    forward_call(q, k, v, o, lse, specs, mask, scale)()
    return o, lse


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dispatch.interpreting() and dtype in (torch.float16, torch.bfloat16)


def backward_calls(do, q, k, v, lse, delta, dq, dk, dv, specs, dbs, mask, scale) -> list[lc.Call]:
    """The two backward launches: dk, dv (and the bias gradients ``dbs``, fp32 tensors of each
    bias's reduced shape or None) over key blocks, then dq over query blocks."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    db_args = []
    for i in range(MAX_BIASES):
        if i < len(specs) and dbs[i] is not None:
            db = dbs[i]
            st = [0 if db.shape[d] == 1 else db.stride(d) for d in range(4)]
            db_args += [db, *st]
        else:
            db_args += [lse, 0, 0, 0, 0]
    red = []
    for i in range(MAX_BIASES):
        red += [specs[i].red_m, specs[i].red_n] if i < len(specs) else [False, False]
    common = dict(
        HAS_B0=len(specs) > 0, HAS_B1=len(specs) > 1, HAS_MASK=mask is not None,
        FP32=_dot_fp32(q.dtype), PREC=_precision(q.dtype),
    )  # fmt: skip
    strides = [*q.stride(), *k.stride(), *v.stride(), *do.stride()]
    tail = [H, Nq, Nk, D, scale * LOG2E, scale]
    kv = _launch("attn_bwd_dkdv", D, q.dtype, Nq, Nk)
    dkdv = lc.Call(
        "attn_bwd_dkdv",
        _attn_bwd_dkdv_kernel,
        (B * H, triton.cdiv(Nk, kv.get("BLOCK_N"))),
        [
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            *strides,
            *_bias_args(specs, q),
            *db_args,
            *_mask_args(mask, q),
            *tail,
        ],  # fmt: skip
        lc.call_meta(
            kv,
            GRAD_B0=dbs[0] is not None if specs else False,
            GRAD_B1=dbs[1] is not None if len(specs) > 1 else False,
            RED0_M=red[0],
            RED0_N=red[1],
            RED1_M=red[2],
            RED1_N=red[3],
            **common,
        ),  # fmt: skip
    )
    ql = _launch("attn_bwd_dq", D, q.dtype, Nq, Nk)
    dqc = lc.Call(
        "attn_bwd_dq",
        _attn_bwd_dq_kernel,
        (B * H, triton.cdiv(Nq, ql.get("BLOCK_M"))),
        [q, k, v, do, lse, delta, dq, *strides, *_bias_args(specs, q), *_mask_args(mask, q), *tail],
        lc.call_meta(ql, **common),
    )
    return [dkdv, dqc]


def _flash_backward(do, q, k, v, o, lse, specs, mask, scale, bias_grads):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = (do.float() * o.float()).sum(-1)  # (B, H, Nq): rowsum(dO * O) of the softmax grad
    dq = dispatch.new_output((B, H, Nq, D), q.dtype, q.device)
    dk = dispatch.new_output((B, H, Nk, D), k.dtype, k.device)
    dv = dispatch.new_output((B, H, Nk, D), v.dtype, v.device)
    dbs = [
        torch.zeros(s.grad_shape, dtype=torch.float32, device=q.device) if g else None
        for s, g in zip(specs, bias_grads)
    ]
    for call in backward_calls(do, q, k, v, lse, delta, dq, dk, dv, specs, dbs, mask, scale):
        call()
    grads = []
    for s, db in zip(specs, dbs):
        if db is None:
            grads.append(None)
            continue
        # A dim of size > 1 with stride 0 (an expanded view) aliases one element many times;
        # the gradient autograd hands back through that view is summed over the aliases, so
        # each alias gets its share of the reduced sum.
        aliases = math.prod(v for v, g in zip(s.view.shape, s.grad_shape) if v != g)
        if aliases > 1:
            db = db / aliases
        g = db.to(s.tensor.dtype).expand(s.view.shape)
        grads.append(g.reshape(s.tensor.shape))
    return dq, dk, dv, grads


class FlashAttention(torch.autograd.Function):
    """softmax(scale q k^T + sum(biases), padded keys excluded) v, fused, with its backward.

    ``apply(q, k, v, mask, scale, *biases)``: q (B, H, Nq, D), k/v (B, H, Nk, D) in fp32, fp16
    or bf16 (fp32 accumulation); mask (B, Nk) bool or None (True = padding); biases: up to two
    float tensors broadcastable to (B, H, Nq, Nk) (leading dim periodic over B). Gradients for
    q, k, v and for every bias that requires one.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, *biases):
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        specs = [bias_spec(b, i, B, H, Nq, Nk) for i, b in enumerate(biases)]
        o, lse = _flash_forward(q, k, v, specs, mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, mask, *biases)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask, *biases = ctx.saved_tensors
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        specs = [bias_spec(b, i, B, H, Nq, Nk) for i, b in enumerate(biases)]
        need = ctx.needs_input_grad[5:]
        dq, dk, dv, dbias = _flash_backward(do, q, k, v, o, lse, specs, mask, ctx.scale, need)
        return (dq, dk, dv, None, None, *dbias)


def flash_attention(q, k, v, biases=(), key_padding_mask=None, scale=None):
    """Launch the fused kernel (autograd-aware). See :class:`FlashAttention`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, key_padding_mask, scale, *biases)

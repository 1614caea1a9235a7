"""Triton kernels of the loss ops: block-wise InfoNCE and the fused prototype cross-entropy
(Sinkhorn-Knopp's are in ``triton_sinkhorn``). The maths is in ``info_nce`` and
``prototype_loss``; these are the CUDA engines behind the same autograd Functions as the chunked
torch ones (same four / two primitives), so both are checked against one reference.

Every kernel accumulates in fp32 whatever it reads (fp32, fp16, bf16). Similarities are built
by looping over the feature dim in chunks, so any d works; gradient outputs are tiled over the
feature dim too (a second grid axis), so the accumulators stay small.

Only imported when a Triton backend is asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from skysense.kernels import dispatch
from skysense.kernels import launch_configs as lc
from skysense.kernels.triton_common import _dot


@triton.jit
def _dot_f32(g, y, SPLIT: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr):
    """g (fp32) @ y (the operands' dtype) with g kept to ~16 bits: for half operands g is split
    into a high and a low half-precision part (two tensor-core dots). Rounding g itself to
    bf16 cost 3-7 % relative error in the InfoNCE gradients, where G b - 2 b_i cancels."""
    hi = g.to(y.dtype)
    acc = _dot(hi, y, FP32, PREC)
    if SPLIT:
        acc += _dot((g - hi.to(tl.float32)).to(y.dtype), y, FP32, PREC)
    return acc


@triton.jit
def _sim(
    X, Y, offs_m, offs_n, n, m, d, sxm, sxd, sym, syd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """X[offs_m] . Y[offs_n]^T over the whole feature dim: (BLOCK_M, BLOCK_N) fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < d
        x = tl.load(
            X + offs_m[:, None] * sxm + offs_d[None, :] * sxd,
            mask=(offs_m < n)[:, None] & dm[None, :],
            other=0.0,
        )
        yT = tl.load(
            Y + offs_n[None, :] * sym + offs_d[:, None] * syd,
            mask=(offs_n < m)[None, :] & dm[:, None],
            other=0.0,
        )
        acc += _dot(x, yT, FP32, PREC)
    return acc


# --- InfoNCE --------------------------------------------------------------------------------------


@triton.jit
def _nce_lse_kernel(
    X, Y, LSE, n, m, d, sxm, sxd, sym, syd, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """LSE[i] = logsumexp_j (X_i . Y_j) * inv_t, online over blocks of Y."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, m, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _sim(
            X, Y, offs_m, offs_n, n, m, d, sxm, sxd, sym, syd, BLOCK_M, BLOCK_N, BLOCK_D, FP32, PREC
        )
        s = tl.where((offs_n < m)[None, :], s * inv_t, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        run_max = new_max
    tl.store(LSE + offs_m, run_max + tl.log(run_sum), mask=offs_m < n)


@triton.jit
def _nce_grad_kernel(
    X, Y, LSE_X, LSE_Y, DX, n, m, d, sxm, sxd, sym, syd, inv_t,
    USE_X: tl.constexpr, USE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    SPLIT: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """DX[i, chunk] = sum_j G_ij Y[j, chunk], G = [exp(S - lse_x_i)] + [exp(S - lse_y_j)]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mm = offs_m < n
    if USE_X:
        lse_x = tl.load(LSE_X + offs_m, mask=mm, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for n0 in range(0, m, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < m
        s = (
            _sim(
                X,
                Y,
                offs_m,
                offs_n,
                n,
                m,
                d,
                sxm,
                sxd,
                sym,
                syd,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                FP32,
                PREC,
            )
            * inv_t
        )
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if USE_X:
            g += tl.exp(s - lse_x[:, None])
        if USE_Y:
            lse_y = tl.load(LSE_Y + offs_n, mask=nm, other=0.0)
            g += tl.exp(s - lse_y[None, :])
        g = tl.where(nm[None, :], g, 0.0)
        y = tl.load(
            Y + offs_n[:, None] * sym + offs_do[None, :] * syd,
            mask=nm[:, None] & (offs_do < d)[None, :],
            other=0.0,
        )
        acc += _dot_f32(g, y, SPLIT, FP32, PREC)
    tl.store(
        DX + offs_m[:, None] * d + offs_do[None, :],
        acc,
        mask=mm[:, None] & (offs_do < d)[None, :],
    )


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not dispatch.interpreting():
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"


def _fp32(dtype: torch.dtype) -> bool:
    return dispatch.interpreting() and dtype in (torch.float16, torch.bfloat16)


def _dtypes(dtype: torch.dtype) -> dict:
    return dict(FP32=_fp32(dtype), PREC=_precision(dtype))


def _launch(kernel: str, dtype: torch.dtype, rows: int, cols: int, d: int = 0) -> lc.Launch:
    """The launch of loss ``kernel`` (a key of ``launch_configs.LOSSES``) for these sizes."""
    # Under the interpreter: few, large blocks (it pays per program and per loop step).
    interp = dispatch.interpreting() and not lc.gpu_blocks_forced()
    return lc.loss_launch(kernel, str(dtype).removeprefix("torch."), rows, cols, d, interp)


def nce_lse_call(x, y, out, inv_t) -> lc.Call:
    """out (n,) fp32 = row log-sum-exp of x y^T * inv_t; x (n, d), y (m, d)."""
    n, d = x.shape
    m = y.shape[0]
    la = _launch("nce_lse", x.dtype, n, m, d)
    return lc.Call(
        "nce_lse",
        _nce_lse_kernel,
        (triton.cdiv(n, la.get("BLOCK_M")),),
        [x, y, out, n, m, d, *x.stride(), *y.stride(), inv_t],
        lc.call_meta(la, **_dtypes(x.dtype)),
    )


def nce_grad_call(x, y, lse_x, lse_y, out, inv_t) -> lc.Call:
    """out (n, d) fp32 = G y, G = [exp(S - lse_x_i)] + [exp(S - lse_y_j)] (a None lse drops
    its term)."""
    n, d = x.shape
    m = y.shape[0]
    la = _launch("nce_grad", x.dtype, n, m, d)
    dummy = lse_x if lse_x is not None else lse_y
    return lc.Call(
        "nce_grad",
        _nce_grad_kernel,
        (triton.cdiv(n, la.get("BLOCK_M")), triton.cdiv(d, la.get("BLOCK_DO"))),
        [
            x,
            y,
            dummy if lse_x is None else lse_x,
            dummy if lse_y is None else lse_y,
            out,
            n,
            m,
            d,
            *x.stride(),
            *y.stride(),
            inv_t,
        ],  # fmt: skip
        lc.call_meta(
            la,
            USE_X=lse_x is not None,
            USE_Y=lse_y is not None,
            SPLIT=x.dtype != torch.float32,
            **_dtypes(x.dtype),
        ),
    )


class TritonInfoNCEEngine:
    """The four InfoNCE primitives of ``info_nce.ChunkedEngine``, on Triton kernels."""

    name = "triton"

    @staticmethod
    def lse_rows(x, y, inv_t):
        out = dispatch.new_output((x.shape[0],), torch.float32, x.device)
        nce_lse_call(x, y, out, inv_t)()
        return out

    @classmethod
    def lse_both(cls, a, b, inv_t):
        # Column log-sum-exps are the rows of b a^T: two launches, no atomics, deterministic.
        return cls.lse_rows(a, b, inv_t), cls.lse_rows(b, a, inv_t)

    @staticmethod
    def grad_rows(x, y, lse_x, lse_y, inv_t):
        out = dispatch.new_output(tuple(x.shape), torch.float32, x.device)
        nce_grad_call(x, y, lse_x, lse_y, out, inv_t)()
        return out

    @classmethod
    def grad_both(cls, a, b, lse_r, lse_c, inv_t):
        return (
            cls.grad_rows(a, b, lse_r, lse_c, inv_t),
            cls.grad_rows(b, a, lse_c, lse_r, inv_t),
        )


# --- prototype cross-entropy ----------------------------------------------------------------------


@triton.jit
def _proto_logits(
    SX, TX, W, TW, C, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Student s = SX W^T / t_s and teacher t = (TX TW^T - C) / t_t tiles, -inf past K."""
    s = _sim(
        SX, W, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, BLOCK_M, BLOCK_K, BLOCK_D, FP32, PREC
    )
    t = _sim(
        TX, TW, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, BLOCK_M, BLOCK_K, BLOCK_D, FP32, PREC
    )
    if HAS_C:
        t -= tl.load(C + offs_k, mask=offs_k < K, other=0.0)[None, :]
    km = (offs_k < K)[None, :]
    s = tl.where(km, s * inv_ts, float("-inf"))
    t = tl.where(km, t * inv_tt, float("-inf"))
    return s, t


@triton.jit
def _proto_fwd_kernel(
    SX, TX, W, TW, C, STATS, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt, k_per_split,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per row and K split: student (max, sum), teacher (max, sum) and sum_k e^{t-max} s."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    k_lo = split * k_per_split
    ms = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ls = tl.zeros([BLOCK_M], tl.float32)
    mt = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lt = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s, t = _proto_logits(
            SX, TX, W, TW, C, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
            HAS_C, BLOCK_M, BLOCK_K, BLOCK_D, FP32, PREC,
        )  # fmt: skip
        new_ms = tl.maximum(ms, tl.max(s, 1))
        safe_ms = tl.where(new_ms == float("-inf"), 0.0, new_ms)
        ls = ls * tl.exp(ms - safe_ms) + tl.sum(tl.exp(s - safe_ms[:, None]), 1)
        ms = new_ms
        new_mt = tl.maximum(mt, tl.max(t, 1))
        safe_mt = tl.where(new_mt == float("-inf"), 0.0, new_mt)
        alpha = tl.exp(mt - safe_mt)
        e = tl.exp(t - safe_mt[:, None])
        lt = lt * alpha + tl.sum(e, 1)
        km = offs_k[None, :] < K  # past K, e = 0 and s = -inf: keep 0 * -inf out of the sum
        acc = acc * alpha + tl.sum(e * tl.where(km, s, 0.0), 1)
        mt = new_mt
    base = STATS + split * N + offs_m
    stride = tl.num_programs(1) * N
    mm = offs_m < N
    tl.store(base, ms, mask=mm)
    tl.store(base + stride, ls, mask=mm)
    tl.store(base + 2 * stride, mt, mask=mm)
    tl.store(base + 3 * stride, lt, mask=mm)
    tl.store(base + 4 * stride, acc, mask=mm)


@triton.jit
def _proto_dx_kernel(
    SX, TX, W, TW, C, LSE_S, LSE_T, DSX, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """DSX[i, chunk] = sum_k (softmax(s)_ik - p_ik) W[k, chunk]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mm = offs_m < N
    lse_s = tl.load(LSE_S + offs_m, mask=mm, other=0.0)
    lse_t = tl.load(LSE_T + offs_m, mask=mm, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s, t = _proto_logits(
            SX, TX, W, TW, C, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
            HAS_C, BLOCK_M, BLOCK_K, BLOCK_D, FP32, PREC,
        )  # fmt: skip
        g = tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])
        g = tl.where(mm[:, None], g, 0.0)
        w = tl.load(
            W + offs_k[:, None] * swk + offs_do[None, :] * swd,
            mask=(offs_k < K)[:, None] & (offs_do < d)[None, :],
            other=0.0,
        )
        acc += _dot_f32(g, w, SPLIT, FP32, PREC)
    tl.store(
        DSX + offs_m[:, None] * d + offs_do[None, :], acc, mask=mm[:, None] & (offs_do < d)[None, :]
    )


@triton.jit
def _proto_dw_kernel(
    SX, TX, W, TW, C, LSE_S, LSE_T, DW, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """DW[k, chunk] = sum_i (softmax(s)_ik - p_ik) SX[i, chunk]."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros([BLOCK_K, BLOCK_DO], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < N
        s, t = _proto_logits(
            SX, TX, W, TW, C, offs_m, offs_k, N, K, d, sxm, sxd, swk, swd, inv_ts, inv_tt,
            HAS_C, BLOCK_M, BLOCK_K, BLOCK_D, FP32, PREC,
        )  # fmt: skip
        lse_s = tl.load(LSE_S + offs_m, mask=mm, other=0.0)
        lse_t = tl.load(LSE_T + offs_m, mask=mm, other=0.0)
        g = tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])
        g = tl.where(mm[:, None], g, 0.0)
        x = tl.load(
            SX + offs_m[:, None] * sxm + offs_do[None, :] * sxd,
            mask=mm[:, None] & (offs_do < d)[None, :],
            other=0.0,
        )
        acc += _dot_f32(tl.trans(g), x, SPLIT, FP32, PREC)
    tl.store(
        DW + offs_k[:, None] * d + offs_do[None, :],
        acc,
        mask=(offs_k < K)[:, None] & (offs_do < d)[None, :],
    )


def proto_fwd_calls(sx, tx, w, tw, center, inv_ts, inv_tt) -> tuple[lc.Call, torch.Tensor]:
    """The forward launch and its (5, splits, N) fp32 statistics buffer: per row and K split,
    student (max, sum), teacher (max, sum) and sum_k e^{t - max} s. sx, tx (N, d); w, tw
    (K, d); center (K,) fp32 or None."""
    n, d = sx.shape
    k = w.shape[0]
    la = _launch("proto_fwd", sx.dtype, n, k, d)
    bm, bk = la.get("BLOCK_M"), la.get("BLOCK_K")
    row_blocks = triton.cdiv(n, bm)
    # Split K across programs when there are too few row blocks to fill the device.
    want = 1 if dispatch.interpreting() else max(1, 256 // row_blocks)
    splits = max(1, min(want, triton.cdiv(k, bk)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    stats = dispatch.new_output((5, splits, n), torch.float32, sx.device)
    has_c = center is not None
    call = lc.Call(
        "proto_fwd",
        _proto_fwd_kernel,
        (row_blocks, splits),
        [
            sx,
            tx,
            w,
            tw,
            center if has_c else sx,
            stats,
            n,
            k,
            d,
            *sx.stride(),
            *w.stride(),
            inv_ts,
            inv_tt,
            k_per_split,
        ],  # fmt: skip
        lc.call_meta(la, HAS_C=has_c, **_dtypes(sx.dtype)),
    )
    return call, stats


def proto_bwd_calls(sx, tx, w, tw, center, inv_ts, inv_tt, lse_s, lse_t, dsx, dw) -> list:
    """The two backward launches: dsx (N, d) and dw (K, d), fp32, G = softmax(s) - p."""
    n, d = sx.shape
    k = w.shape[0]
    has_c = center is not None
    args = [sx, tx, w, tw, center if has_c else sx, lse_s, lse_t]
    rest = [n, k, d, *sx.stride(), *w.stride(), inv_ts, inv_tt]
    consts = dict(HAS_C=has_c, SPLIT=sx.dtype != torch.float32, **_dtypes(sx.dtype))
    dx = _launch("proto_dx", sx.dtype, n, k, d)
    dwl = _launch("proto_dw", sx.dtype, n, k, d)
    return [
        lc.Call(
            "proto_dx",
            _proto_dx_kernel,
            (triton.cdiv(n, dx.get("BLOCK_M")), triton.cdiv(d, dx.get("BLOCK_DO"))),
            [*args, dsx, *rest],
            lc.call_meta(dx, **consts),
        ),
        lc.Call(
            "proto_dw",
            _proto_dw_kernel,
            (triton.cdiv(k, dwl.get("BLOCK_K")), triton.cdiv(d, dwl.get("BLOCK_DO"))),
            [*args, dw, *rest],
            lc.call_meta(dwl, **consts),
        ),
    ]


class TritonPrototypeEngine:
    """The forward / backward primitives of ``prototype_loss.ChunkedEngine`` on Triton."""

    name = "triton"

    @staticmethod
    def forward(sx, tx, w, tw, center, inv_ts, inv_tt):
        call, stats = proto_fwd_calls(sx, tx, w, tw, center, inv_ts, inv_tt)
        call()
        ms, ls, mt, lt, acc = stats.unbind(0)
        gms, gmt = ms.amax(0), mt.amax(0)
        ls = (ls * torch.exp(ms - gms)).sum(0)
        alpha = torch.exp(mt - gmt)
        lt, acc = (lt * alpha).sum(0), (acc * alpha).sum(0)
        lse_s, lse_t = gms + torch.log(ls), gmt + torch.log(lt)
        return lse_s - acc / lt, lse_s, lse_t

    @staticmethod
    def backward(sx, tx, w, tw, center, inv_ts, inv_tt, lse_s, lse_t):
        dsx = dispatch.new_output(tuple(sx.shape), torch.float32, sx.device)
        dw = dispatch.new_output(tuple(w.shape), torch.float32, sx.device)
        for call in proto_bwd_calls(sx, tx, w, tw, center, inv_ts, inv_tt, lse_s, lse_t, dsx, dw):
            call()
        return dsx, dw

"""Fused attention in Triton: forward and backward (dq, dk, dv, dbias) with additive biases read
through their strides and a key padding mask.

The forward keeps, per block of queries, a running max and sum of exp (the online softmax) over
blocks of keys, so the (N, N) scores are never stored; it saves the log-sum-exp per query for the
backward, which recomputes the probabilities block by block (one kernel for dk, dv and dbias over
key blocks, one for dq over query blocks). Head dims that are not powers of two (Swin-H's 44) are
padded to the next power of two inside the kernel with masked loads.

Biases: up to two tensors, read as ``attention_bias.bias_spec`` describes them (a broadcast dim
has stride 0, a leading dim Bb that divides B is applied periodically). Their gradient is reduced to each
bias's own shape with fp32 atomics.

This module checks and launches; the kernels are in ``triton_attention_kernels``, their launch
configurations in ``launch_configs``. Only imported when a Triton backend is asked for (importing triton is slow and must follow
``TRITON_INTERPRET``).
"""

from __future__ import annotations

import math

import torch
import triton

from skysense.kernels import dispatch
from skysense.kernels import launch_configs as lc
from skysense.kernels.attention_bias import MAX_BIASES, BiasSpec, bias_spec
from skysense.kernels.triton_attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
)

LOG2E = 1.4426950408889634

# --- launcher ------------------------------------------------------------------------------------


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

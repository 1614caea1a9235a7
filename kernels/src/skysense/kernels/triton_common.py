"""Triton helpers shared by the attention and loss kernels (``@triton.jit`` functions that
kernels in other modules call)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, FP32: tl.constexpr, PREC: tl.constexpr):
    # Under the interpreter half-precision dots are wrong (bf16) or accumulate in fp16 through
    # numpy: FP32 upcasts the operands there, which is what the GPU's fp32 accumulation computes.
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)

"""The one broadcasting rule of attention biases, shared by every attention backend.

A bias is a float tensor of at most 4 dims, right-aligned against (B, H, Nq, Nk); each dim is 1
(broadcast) or the full size, except the leading one, which may also be a divisor Bb of B,
applied periodically (batch b reads bias[b % Bb]): Swin passes its relative position bias
(1, H, N, N) and its shift mask (nW, 1, N, N) for B * nW windows laid out image-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_HEAD_DIM = 256  # the largest head dim the fused Triton kernel takes
MAX_BIASES = 2  # the most bias tensors it adds to the scores


@dataclass
class BiasSpec:
    """One additive bias as the backends read it: a 4-d view with stride 0 on broadcast dims."""

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
    """Check bias number ``index`` against (B, H, Nq, Nk) (TypeError / ValueError naming it)
    and describe how the backends read it."""
    if not bias.is_floating_point():
        raise TypeError(f"attention: bias[{index}] must be a float tensor, got {bias.dtype}")
    if bias.dim() > 4:
        raise ValueError(f"attention: bias[{index}] has {bias.dim()} dims, at most 4 allowed")
    view = bias[(None,) * (4 - bias.dim())]
    target = (B, H, Nq, Nk)
    strides, gshape = [], []
    bb = 1
    for d, (size, st, want) in enumerate(zip(view.shape, view.stride(), target)):
        if size not in (1, want) and not (d == 0 and want % size == 0):
            rule = " (or a divisor of B, applied periodically)" if d == 0 else ""
            raise ValueError(
                f"attention: bias[{index}] of shape {tuple(bias.shape)} does not broadcast to "
                f"(B, H, Nq, Nk) = {target}: dim {d} has {size}, expected 1 or {want}{rule}"
            )
        if size == 1 or st == 0:
            strides.append(0)
            gshape.append(1)
        else:
            strides.append(st)
            gshape.append(size)
            if d == 0:
                bb = size
    return BiasSpec(bias, view, bb, tuple(strides), tuple(gshape))

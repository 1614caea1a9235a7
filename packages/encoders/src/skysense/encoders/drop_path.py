"""Stochastic depth: drop a residual branch for whole samples."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the residual branch of a random subset of samples during training.

    Kept samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged. A "sample" is
    the leading dimension of the input: for the temporal fusion that is one location's token
    sequence, so locations are dropped independently.

    Args:
        p: probability of dropping a sample's branch, in [0, 1).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1); got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ...) any float dtype -> same shape and dtype."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"

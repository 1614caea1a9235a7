"""The transformer feed-forward network."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, on the last dimension.

    Args:
        dim: input and output width.
        hidden_dim: width of the hidden layer (``mlp_ratio * dim`` in the blocks).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) float -> (..., dim)."""
        return self.fc2(self.act(self.fc1(x)))

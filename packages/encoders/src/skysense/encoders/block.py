"""The pre-norm transformer block of the ViTs and of the temporal fusion."""

from __future__ import annotations

import torch
from torch import nn

from skysense.encoders.attention import Attention
from skysense.encoders.drop_path import DropPath
from skysense.encoders.mlp import Mlp


class Block(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(Mlp(LN(x))).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``.
        qkv_bias: bias on the q, k, v projection.
        drop_path: stochastic-depth probability of both branches.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N, dim) float; key_padding_mask: (B, N) bool, True = padding. -> (B, N, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_head(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, n: int = 1
    ) -> torch.Tensor:
        """The block's output for the first ``n`` tokens only (they still attend to all):
        x (B, N, dim) -> (B, n, dim), equal to ``forward(x)[:, :n]`` at a fraction of the cost.
        The fusion's last block needs only its extra token."""
        h = self.norm1(x)
        x = x[:, :n] + self.drop_path(self.attn(h, key_padding_mask, num_queries=n))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def block_stack(
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    drop_path_rate: float,
    norm_eps: float,
) -> nn.ModuleList:
    """``depth`` pre-norm :class:`Block` s with stochastic depth rising linearly from 0 to
    ``drop_path_rate`` (the ViT encoders' and the temporal fusion's stack)."""
    dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_eps=norm_eps)
        for i in range(depth)
    )

"""Multi-head self-attention through ``skysense.kernels.attention`` (ViT and fusion blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skysense.kernels import attention


class Attention(nn.Module):
    """Self-attention over tokens: qkv projection, ``kernels.attention``, output projection.

    Args:
        dim: token width; ``dim % num_heads == 0``.
        num_heads: attention heads.
        qkv_bias: bias on the q, k, v projection.
        attn_drop: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        num_queries: int | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim) float; key_padding_mask: (B, N) bool, True where the token is padding
        (it is then ignored as a key; its own output is computed but meaningless).
        ``num_queries``: only the first n tokens query (all N are keys), as when only their
        output is wanted. Returns (B, N or n, dim)."""
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        if num_queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            bq, bkv = (None, None) if b is None else (b[:C], b[C:])
            q = F.linear(x[:, :num_queries], w[:C], bq)
            q = q.reshape(B, num_queries, H, D).transpose(1, 2)
            k, v = F.linear(x, w[C:], bkv).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=drop)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], C))

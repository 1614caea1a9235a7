"""Grid alignment: series features onto the HR encoder's stage-4 grid (1x1 conv + PixelShuffle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GridAlign(nn.Module):
    """1x1 convolution to ``upscale**2 * out_dim`` channels, then PixelShuffle(upscale).

    At paper size a ViT-L map (1024, 16, 16) becomes (2816, 64, 64), Swin-H's stage-4 grid.
    Computed channels-last as a matmul (the same numbers as ``nn.Conv2d`` + ``nn.PixelShuffle``
    on channels-first input, without the layout round trips); the weight keeps the conv shape
    (out, in, 1, 1) so released heads load as they are.

    Args:
        in_dim: ViT width.
        out_dim: fusion-grid width C_g (Swin's last stage width).
        upscale: PixelShuffle factor.
    """

    def __init__(self, in_dim: int, out_dim: int, upscale: int):
        super().__init__()
        self.out_dim = out_dim
        self.upscale = upscale
        self.proj = nn.Conv2d(in_dim, upscale**2 * out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, h, w, in_dim) channels-last -> (N, h * upscale, w * upscale, out_dim)."""
        N, h, w, _ = x.shape
        u, C = self.upscale, self.out_dim
        y = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)
        if u == 1:
            return y
        # PixelShuffle puts channel c * u^2 + i * u + j at (c, h u + i, w u + j).
        y = y.view(N, h, w, C, u, u).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(N, h * u, w * u, C)

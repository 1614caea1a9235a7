"""A feature pyramid from single-resolution features (ViT taps, the fused map).

The ViT encoders of the S2/S1 series and the fusion transformer give maps at one resolution
(the token grid). Dense heads (UperNet, the change head) want a pyramid: as in ViTDet's simple
feature pyramid, each level is resampled from one map by a learned transposed convolution
(finer levels) or a max-pool (coarser ones), then projected to a common width."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from skysense.tasks.downstream.heads.norm import ConvNormAct, norm_layer


class _Resample(nn.Module):
    def __init__(self, channels: int, scale: float, norm: str):
        super().__init__()
        self.scale = scale
        ups = []
        s = scale
        while s > 1:
            ups += [nn.ConvTranspose2d(channels, channels, 2, stride=2)]
            s /= 2
            if s > 1:
                ups += [norm_layer(norm, channels), nn.GELU()]
        self.up = nn.Sequential(*ups)
        if scale > 1 and s != 1:
            raise ValueError(f"pyramid scale {scale} is not a power of 2")
        if scale < 1 and (1 / scale) != int(1 / scale):
            raise ValueError(f"pyramid scale {scale} is not 1 / an integer")

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            return self.up(x)
        if self.scale < 1:
            k = int(round(1 / self.scale))
            # ceil_mode: odd grids (e.g. 15 x 15 tokens) still give ceil(h / k) cells.
            return F.max_pool2d(x, k, k, ceil_mode=True)
        return x


class SimplePyramid(nn.Module):
    """Maps at one resolution -> a pyramid, finest level first.

    Args:
        in_channels: channels of each input map: one map (used for every level) or one per
            level (e.g. the four ViT taps, shallow to deep).
        out_channels: width of every output level.
        scales: resampling factor of each level relative to the input grid, finest first.

    ``forward(maps)``: sequence of (B, C_i, h, w) -> list of (B, out_channels, h*s, w*s).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        scales: Sequence[float] = (2, 1, 0.5, 0.25),
        norm: str = "gn",
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        if len(self.in_channels) not in (1, len(scales)):
            raise ValueError(
                f"SimplePyramid takes 1 map or one per level ({len(scales)}), "
                f"got {len(self.in_channels)}"
            )
        chans = self.in_channels * (len(scales) if len(self.in_channels) == 1 else 1)
        self.resample = nn.ModuleList(_Resample(c, s, norm) for c, s in zip(chans, scales))
        self.proj = nn.ModuleList(ConvNormAct(c, out_channels, 1, norm) for c in chans)
        self.out_channels = [out_channels] * len(scales)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.in_channels):
            raise ValueError(
                f"SimplePyramid built for {len(self.in_channels)} maps, got {len(maps)}"
            )
        maps = list(maps) * (len(self.proj) if len(maps) == 1 else 1)
        return [p(r(m)) for p, r, m in zip(self.proj, self.resample, maps)]

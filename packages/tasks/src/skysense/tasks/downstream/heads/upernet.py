"""UperNet decode head (Xiao et al., ECCV 2018): a pyramid pooling module on the coarsest level,
a top-down FPN over all levels, and the fusion of every level at the finest resolution.

Written from the paper's description; the layout (PPM scales 1, 2, 3, 6; one 3 x 3 FPN conv per
level; a 3 x 3 fusion conv over the concatenated levels) is the common UperNet configuration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skysense.tasks.downstream.heads.norm import ConvNormAct


class PyramidPooling(nn.Module):
    """PPM: average-pool the map to s x s for each scale s, project, upsample, concatenate with
    the input and fuse with a 3 x 3 conv. (B, C_in, h, w) -> (B, C, h, w)."""

    def __init__(
        self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6), norm="gn"
    ):
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvNormAct(in_channels, channels, 1, norm) for _ in scales)
        self.bottleneck = ConvNormAct(in_channels + len(scales) * channels, channels, 3, norm)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for s, branch in zip(self.scales, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, s))
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, 1))


class UperNetHead(nn.Module):
    """UperNet on a feature pyramid, finest level first.

    Args:
        in_channels: channels of each level, finest first (e.g. the four Swin stages).
        channels: the head's width.
        n_classes: K.
        pool_scales: PPM output sizes.
        dropout: dropout before the classifier.
        norm: "gn" or "bn" (see :func:`norm_layer`).

    ``forward(feats)``: a sequence of (B, C_i, h_i, w_i) maps, each level at most as fine as the
    one before -> (B, K, h_0, w_0) logits at the finest level's resolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        n_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "gn",
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        if not self.in_channels:
            raise ValueError("UperNetHead needs at least one pyramid level")
        self.ppm = PyramidPooling(self.in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList(
            ConvNormAct(c, channels, 1, norm) for c in self.in_channels[:-1]
        )
        self.fpn = nn.ModuleList(
            ConvNormAct(channels, channels, 3, norm) for _ in self.in_channels[:-1]
        )
        self.fuse = ConvNormAct(len(self.in_channels) * channels, channels, 3, norm)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, n_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.in_channels):
            raise ValueError(
                f"UperNetHead built for {len(self.in_channels)} levels, got {len(feats)}"
            )
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(
                    f"UperNetHead level {i}: expected (B, {c}, h, w), got {tuple(f.shape)}"
                )
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        laterals.append(self.ppm(feats[-1]))
        # Top-down: each level receives the upsampled sum of the coarser ones.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.cls(self.drop(self.fuse(torch.cat(outs, 1))))

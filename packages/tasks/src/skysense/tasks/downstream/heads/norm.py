"""Convolution + normalisation + ReLU, the building block of the dense heads."""

from __future__ import annotations

from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """ "gn": GroupNorm (default: fine-tuning batches on a CPU are 2-8 samples, too few for
    BatchNorm's statistics, and a 1 x 1 pooled map with batch 1 breaks BatchNorm in training);
    "bn": BatchNorm2d (the UperNet paper's choice at large batch)."""
    if kind == "gn":
        # At least 4 channels per group: the PPM's 1 x 1 pooled maps need more than one value
        # per group to normalise.
        groups = next(
            g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 4 or g == 1
        )
        return nn.GroupNorm(groups, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'gn' or 'bn', not {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias: the norm has one) -> norm -> ReLU; (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, norm: str = "gn"):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
            norm_layer(norm, c_out),
            nn.ReLU(inplace=True),
        )

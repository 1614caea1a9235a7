"""Change detection head: the encoder's pyramids of two dates, fused level by level, decoded by
UperNet into per-pixel change logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from skysense.tasks.downstream.heads.norm import ConvNormAct
from skysense.tasks.downstream.heads.upernet import UperNetHead


class SiameseFusion(nn.Module):
    """Per level: concat(f1, f2, |f1 - f2|) -> 1 x 1 conv-norm-ReLU back to C_i.

    The absolute difference makes "no change" an easy pattern to learn (zero), the concatenation
    keeps the direction of the change (built-up appearing vs disappearing)."""

    def __init__(self, in_channels: Sequence[int], norm: str = "gn"):
        super().__init__()
        self.proj = nn.ModuleList(ConvNormAct(3 * c, c, 1, norm) for c in in_channels)

    def forward(self, f1: Sequence[Tensor], f2: Sequence[Tensor]) -> list[Tensor]:
        if len(f1) != len(f2) or len(f1) != len(self.proj):
            raise ValueError(
                f"SiameseFusion: {len(f1)} and {len(f2)} levels for a head of {len(self.proj)}"
            )
        out = []
        for i, (p, a, b) in enumerate(zip(self.proj, f1, f2)):
            if a.shape != b.shape:
                raise ValueError(
                    f"change head level {i}: date 1 features {tuple(a.shape)} != date 2 "
                    f"features {tuple(b.shape)} (the two dates must cover the same pixels)"
                )
            out.append(p(torch.cat([a, b, (a - b).abs()], 1)))
        return out


class ChangeHead(nn.Module):
    """Two pyramids (finest first) -> (B, K, h_0, w_0) change logits (K = 2: no change, change).

    Args:
        in_channels: channels of each pyramid level.
        channels: UperNet width.
        n_classes: K.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        n_classes: int = 2,
        dropout: float = 0.1,
        norm: str = "gn",
    ):
        super().__init__()
        self.fusion = SiameseFusion(in_channels, norm)
        self.decoder = UperNetHead(in_channels, channels, n_classes, dropout=dropout, norm=norm)

    def forward(self, f1: Sequence[Tensor], f2: Sequence[Tensor]) -> Tensor:
        return self.decoder(self.fusion(f1, f2))

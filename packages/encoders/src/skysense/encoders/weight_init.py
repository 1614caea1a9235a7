"""Weight initialisation of the encoders' transformer layers (ViT, Swin-V2, temporal fusion)."""

from __future__ import annotations

from torch import nn


def init_weights(m: nn.Module) -> None:
    """For ``module.apply``: linear weights ~ truncated normal (std 0.02), biases 0; LayerNorm
    weight 1, bias 0. Other modules keep their own initialisation."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

"""Scene classification head: pooled features -> class logits (single- or multi-label)."""

from __future__ import annotations

from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """LayerNorm -> dropout -> linear.

    The norm has no affine parameters, so with a frozen encoder the head stays a linear probe
    of standardised features (the usual linear-probing protocol normalises features first).

    Args:
        in_dim: D, width of the pooled feature.
        n_classes: K.
        dropout: dropout before the linear layer.
    """

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, n_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, D) float32 -> (B, K) logits."""
        if x.ndim != 2 or x.shape[1] != self.fc.in_features:
            raise ValueError(
                f"ClassificationHead expects (B, {self.fc.in_features}) pooled features, "
                f"got {tuple(x.shape)}"
            )
        return self.fc(self.drop(self.norm(x)))

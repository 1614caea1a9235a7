"""DINO-style projection head: an MLP to a bottleneck, L2-normalised, then a weight-normalised
prototype layer of K rows.

The prototype layer is never applied here: the loss hands the normalised bottleneck features and
the normalised prototype matrix to ``skysense.kernels.prototype_cross_entropy``, which fuses the
(N, bottleneck) x (bottleneck, K) product with the softmax so the (N, K) logits are never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (``n_layers`` linear layers, GELU between) to ``bottleneck_dim``, L2 normalisation, and
    ``n_prototypes`` weight-normalised prototypes.

    The prototypes are stored as a free matrix ``prototypes`` (K, bottleneck) whose rows are
    normalised on use: the same function and gradient as ``weight_norm`` with its gain fixed at 1
    (the DINO recipe), without the deprecated parametrisation.

    Defaults are DINOv2's: hidden 2048, bottleneck 256, 3 layers, K = 65536.

    Args:
        in_dim: width of the features fed to the head (C_g for the modality features, D_f for
            the fused ones).
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead: n_layers must be >= 1, got {n_layers}")
        if n_prototypes < 1:
            raise ValueError(f"DINOHead: n_prototypes must be >= 1, got {n_prototypes}")
        self.in_dim = in_dim
        self.n_prototypes = n_prototypes
        self.bottleneck_dim = bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, bottleneck_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Only the direction of a prototype matters (rows are normalised on use).
        nn.init.normal_(self.prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) float -> (N, bottleneck_dim) L2-normalised features, same dtype."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead: features have width {x.shape[-1]}, the head expects {self.in_dim}"
            )
        return F.normalize(self.mlp(x), dim=-1)

    def prototype_weight(self) -> torch.Tensor:
        """(K, bottleneck_dim) prototypes with unit rows (the weight-normalised last layer)."""
        return F.normalize(self.prototypes, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, K) logits. Materialises (N, K): for tests and small K only."""
        return self(x) @ self.prototype_weight().t()

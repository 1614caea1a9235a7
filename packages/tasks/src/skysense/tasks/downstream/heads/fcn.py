"""Auxiliary FCN head: a few 3 x 3 convolutions and a classifier on one pyramid level.

UperNet fine-tuning in the paper (iSAID) adds it on the third stage with a loss weight of 0.4
(the weight is a config field of the task)."""

from __future__ import annotations

from torch import Tensor, nn

from skysense.tasks.downstream.heads.norm import ConvNormAct


class FCNHead(nn.Module):
    """(B, C_in, h, w) -> (B, K, h, w) logits.

    Args:
        in_channels: C_in.
        channels: width of the hidden convolutions.
        n_classes: K.
        n_convs: number of 3 x 3 conv-norm-ReLU blocks.
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        n_classes: int,
        n_convs: int = 1,
        dropout: float = 0.1,
        norm: str = "gn",
    ):
        super().__init__()
        layers = [
            ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm)
            for i in range(n_convs)
        ]
        self.convs = nn.Sequential(*layers)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, n_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.drop(self.convs(x)))

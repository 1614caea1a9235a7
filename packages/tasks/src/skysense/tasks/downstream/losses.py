"""Training losses of the task kinds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX


class TaskLoss(nn.Module):
    """classification: softmax cross-entropy on ``label`` (B,); multilabel: sigmoid binary
    cross-entropy on ``label`` (B, K); segmentation / change: pixel cross-entropy on ``mask``
    (B, H, W) with ``IGNORE_INDEX`` left out, optional class weights, plus ``aux_weight`` x the
    auxiliary head's loss; detection: the sum of torchvision's RPN and box losses.

    Args:
        kind: the task kind.
        class_weights: (K,) weights of the cross-entropy (None: equal).
        aux_weight: weight of the auxiliary FCN loss (segmentation).
    """

    def __init__(
        self, kind: str, class_weights: Sequence[float] | None = None, aux_weight: float = 0.0
    ):
        super().__init__()
        self.kind, self.aux_weight = kind, aux_weight
        w = (
            torch.tensor(list(class_weights), dtype=torch.float32)
            if class_weights is not None
            else None
        )
        self.register_buffer("class_weights", w, persistent=False)

    def forward(self, out, batch: Mapping) -> Tensor:
        if self.kind == "detection":
            return torch.stack(list(out.values())).sum()
        logits = out["logits"]
        if self.kind == "classification":
            return F.cross_entropy(logits, batch["label"].long(), weight=self.class_weights)
        if self.kind == "multilabel":
            label = batch["label"].float()
            if label.shape != logits.shape:
                raise ValueError(
                    f"multi-label targets {tuple(label.shape)} vs logits {tuple(logits.shape)}"
                )
            return F.binary_cross_entropy_with_logits(logits, label)
        mask = batch["mask"].long()
        if mask.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} vs logits {tuple(logits.shape)}")
        if not (mask != IGNORE_INDEX).any():
            # A crop without any labelled pixel: zero loss that keeps the graph (no NaN).
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, mask, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        if "aux" in out and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(
                out["aux"], mask, weight=self.class_weights, ignore_index=IGNORE_INDEX
            )
        return loss

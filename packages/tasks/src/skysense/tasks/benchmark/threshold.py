"""Change detection's P(change) over whole scenes, for the decision threshold.

Argmax over two classes is a threshold of 0.5 on P(change), which over-predicts change where
change is rare (1-3 % of a city's pixels) and the loss is class-weighted. Fine-tuning (plain
`skysense finetune` and the benchmark's fine-tuning protocols and U-Net alike) holds whole
training cities out as a validation split (:mod:`skysense.tasks.downstream.holdout`); the
model's P(change) over their labelled pixels (:func:`change_probs`) gives the precision/recall
curve and the threshold of the best F1 (:func:`skysense.tasks.downstream.validation
.choose_threshold`), which the evaluation then uses.
"""

from __future__ import annotations

import torch

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX
from skysense.tasks.downstream.evaluation import predict_scene


@torch.no_grad()
def change_probs(model, scenes, ev, device) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, P(change) over labelled pixels (N,), labels (N,)) of every scene."""
    model.eval()
    out = []
    for s in scenes:
        h, w = s.mask.shape
        p = predict_scene(model, "change", s.sample, h, w, 2, ev.window, ev.overlap,
                          ev.batch_size, device)[1]  # fmt: skip
        keep = s.mask != IGNORE_INDEX
        out.append((str(s.name), p[keep].float().cpu(), s.mask[keep].long()))
    return out

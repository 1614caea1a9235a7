"""The downstream metrics, in one module: confusion-matrix scores (OA, IoU, F1), average
precision for multi-label classification (mAP) and for detection (mAP50).

Definitions follow torchmetrics' (written here from the definitions, not imported):

- Confusion matrix ``cm[t, p]``: number of samples (pixels) of true class ``t`` predicted as ``p``;
  targets equal to ``ignore_index`` are left out.
- OA = trace(cm) / sum(cm).
- IoU_c = TP / (TP + FP + FN); F1_c = 2 TP / (2 TP + FP + FN). A class that occurs in neither
  targets nor predictions (denominator 0) has NaN and is left out of the means (mIoU, mF1).
- Binary average precision (``average_precision``): the step-wise area under the
  precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in
  decreasing order (no interpolation: sklearn's ``average_precision_score``, torchmetrics'
  ``BinaryAveragePrecision``). Undefined (NaN) without positive targets.
- Multi-label mAP: "macro" = mean of the per-class APs over the classes that have at least one
  positive target; "micro" = AP of all (sample, class) pairs flattened.
- Detection AP at an IoU threshold (mAP50 for 0.5), per class then averaged over classes that
  have ground truth: detections of all images sorted by score (stable for ties), each matched
  greedily to the unmatched ground-truth box of the same image with the highest IoU >= threshold
  (a true positive), else a false positive; precision is made monotone (the envelope from the
  right); AP = mean of the precision at the 101 recall points 0, 0.01, ..., 1 ("coco101", the
  COCO / torchmetrics ``MeanAveragePrecision`` rule) or the exact area under the envelope
  ("all", VOC 2010+).

Every function takes and returns CPU tensors or Python floats; the accumulating classes
(:class:`ConfusionMatrix`, :class:`MultilabelAveragePrecision`, :class:`DetectionAveragePrecision`)
take batches with ``update`` and give the scores with ``compute``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ConfusionMatrix",
    "DetectionAveragePrecision",
    "MultilabelAveragePrecision",
    "average_precision",
    "binary_scores",
    "box_iou",
    "confusion_matrix",
    "detection_average_precision",
    "multilabel_average_precision",
    "overall_accuracy",
    "per_class_f1",
    "per_class_iou",
    "segmentation_scores",
]


def confusion_matrix(
    pred: Tensor, target: Tensor, n_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Counts of (true, predicted) class pairs.

    Args:
        pred: integer class predictions, any shape.
        target: integer true classes, the same shape as ``pred``.
        n_classes: K.
        ignore_index: targets with this value are not counted.
    Returns:
        (K, K) int64, rows = true class, columns = predicted class.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion_matrix: prediction shape {tuple(pred.shape)} != target shape "
            f"{tuple(target.shape)}"
        )
    pred = pred.reshape(-1).long().cpu()
    target = target.reshape(-1).long().cpu()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("prediction", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
            raise ValueError(
                f"confusion_matrix: {name} class {int(t.min()) if int(t.min()) < 0 else int(t.max())}"
                f" outside 0..{n_classes - 1}"
                + (f" (ignore_index={ignore_index})" if ignore_index is not None else "")
            )
    idx = target * n_classes + pred
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def overall_accuracy(cm: Tensor) -> float:
    """trace / total of a (K, K) confusion matrix; NaN when it is empty."""
    total = cm.sum().item()
    return float(cm.diagonal().sum().item() / total) if total else math.nan


def _tp_fp_fn(cm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    cm = cm.double()
    tp = cm.diagonal()
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def per_class_iou(cm: Tensor) -> Tensor:
    """(K,) float64 IoU per class, NaN where the class is in neither targets nor predictions."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = tp + fp + fn
    return torch.where(den > 0, tp / den.clamp_min(1), torch.full_like(den, math.nan))


def per_class_f1(cm: Tensor) -> Tensor:
    """(K,) float64 F1 (Dice) per class, NaN where the class is absent from both."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.full_like(den, math.nan))


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def segmentation_scores(cm: Tensor) -> dict[str, float]:
    """OA, mIoU and mF1 of a confusion matrix."""
    return {
        "OA": overall_accuracy(cm),
        "mIoU": _nanmean(per_class_iou(cm)),
        "mF1": _nanmean(per_class_f1(cm)),
    }


def binary_scores(cm: Tensor, positive: int = 1) -> dict[str, float]:
    """Precision, recall, F1 and IoU of class ``positive`` (the change class of change detection).

    Precision is NaN without positive predictions, recall NaN without positive targets; F1 and
    IoU are 0 when there are positives on either side but no true positive, NaN when neither side
    has any (nothing to detect, nothing detected).
    """
    tp, fp, fn = (v[positive].item() for v in _tp_fp_fn(cm))
    return {
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "F1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "IoU": tp / (tp + fp + fn) if tp + fp + fn else math.nan,
    }


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix over batches of class predictions."""

    def __init__(self, n_classes: int, ignore_index: int | None = None):
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: integer tensors of the same shape ((B,) or (B, H, W))."""
        self.cm += confusion_matrix(pred, target, self.n_classes, self.ignore_index)

    def compute(self) -> Tensor:
        return self.cm.clone()


# ---------------------------------------------------------------- average precision (ranking)


def average_precision(scores: Tensor, target: Tensor) -> float:
    """Step-wise area under the precision-recall curve of one binary problem.

    Args:
        scores: (N,) float, higher = more likely positive.
        target: (N,) {0, 1}.
    Returns:
        AP in [0, 1]; NaN when ``target`` has no positive.
    """
    scores = scores.reshape(-1).double().cpu()
    target = target.reshape(-1).cpu()
    if scores.shape != target.shape:
        raise ValueError(f"average_precision: {scores.numel()} scores for {target.numel()} targets")
    target = target.double()
    n_pos = target.sum().item()
    if n_pos == 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], target[order]
    tp = torch.cumsum(t, 0)
    fp = torch.cumsum(1 - t, 0)
    # Tied scores form one threshold: keep the last index of each run of equal scores.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def multilabel_average_precision(
    scores: Tensor, target: Tensor, average: str | None = "macro"
) -> float | Tensor:
    """Average precision of a multi-label problem.

    Args:
        scores: (N, K) float.
        target: (N, K) {0, 1}.
        average: "macro" (mean over classes with a positive), "micro" (all pairs flattened) or
            None (the (K,) per-class APs, NaN for classes without a positive).
    """
    if scores.shape != target.shape or scores.ndim != 2:
        raise ValueError(
            f"multilabel_average_precision: scores {tuple(scores.shape)} and targets "
            f"{tuple(target.shape)} must both be (N, K)"
        )
    if average == "micro":
        return average_precision(scores.reshape(-1), target.reshape(-1))
    per_class = torch.tensor(
        [average_precision(scores[:, k], target[:, k]) for k in range(scores.shape[1])],
        dtype=torch.float64,
    )
    if average is None:
        return per_class
    if average != "macro":
        raise ValueError(f"average must be 'macro', 'micro' or None, not {average!r}")
    return _nanmean(per_class)


class MultilabelAveragePrecision:
    """Accumulates (N, K) scores and targets; ``compute`` gives macro, micro and per-class APs."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.scores: list[Tensor] = []
        self.targets: list[Tensor] = []

    def update(self, scores: Tensor, target: Tensor) -> None:
        if scores.shape[-1] != self.n_classes or target.shape != scores.shape:
            raise ValueError(
                f"MultilabelAveragePrecision: expected (B, {self.n_classes}) scores and targets, "
                f"got {tuple(scores.shape)} and {tuple(target.shape)}"
            )
        self.scores.append(scores.detach().float().cpu())
        self.targets.append(target.detach().cpu())

    def compute(self) -> dict:
        s = torch.cat(self.scores) if self.scores else torch.zeros(0, self.n_classes)
        t = torch.cat(self.targets) if self.targets else torch.zeros(0, self.n_classes)
        per_class = multilabel_average_precision(s, t, average=None)
        return {
            "mAP": _nanmean(per_class),
            "mAP_micro": multilabel_average_precision(s, t, average="micro"),
            "per_class_AP": per_class,
        }


# ------------------------------------------------------------------------- detection AP


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, 4) x (M, 4) boxes (x1, y1, x2, y2) -> (N, M) float64 IoU."""
    a, b = a.double(), b.double()
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def _precision_envelope_ap(tp: Tensor, n_gt: int, interpolation: str) -> float:
    """AP from the TP flags (in decreasing score order) of one class's detections."""
    if n_gt == 0:
        return math.nan
    if tp.numel() == 0:
        return 0.0
    tpc = torch.cumsum(tp.double(), 0)
    fpc = torch.cumsum(1 - tp.double(), 0)
    recall = tpc / n_gt
    precision = tpc / (tpc + fpc)
    # Monotone envelope: precision at recall r = the best precision at any recall >= r.
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    if interpolation == "coco101":
        points = torch.linspace(0, 1, 101, dtype=torch.float64)
        # First detection index whose recall reaches each point; beyond the last recall: 0.
        idx = torch.searchsorted(recall, points, side="left")
        vals = torch.where(
            idx < recall.numel(),
            envelope[idx.clamp(max=recall.numel() - 1)],
            torch.zeros_like(points),
        )
        return float(vals.mean())
    if interpolation == "all":
        r = torch.cat([recall.new_zeros(1), recall])
        return float(((r[1:] - r[:-1]) * envelope).sum())
    raise ValueError(f"interpolation must be 'coco101' or 'all', not {interpolation!r}")


def detection_average_precision(
    preds: Sequence[dict],
    targets: Sequence[dict],
    iou_threshold: float = 0.5,
    interpolation: str = "coco101",
) -> dict:
    """Per-class AP at one IoU threshold, and their mean (mAP50 at 0.5).

    Args:
        preds: per image, ``{"boxes": (N, 4) xyxy float, "scores": (N,), "labels": (N,) int64}``.
        targets: per image, ``{"boxes": (M, 4), "labels": (M,)}``.
        iou_threshold: minimum IoU of a true positive.
        interpolation: "coco101" or "all" (see the module docstring).
    Returns:
        ``{"mAP": float, "per_class": {label: AP}}``; classes without ground truth are left out
        (detections of such classes lower nothing, as in COCO).
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction entries for {len(targets)} target entries")
    classes = sorted({int(c) for t in targets for c in t["labels"].reshape(-1).tolist()})
    per_class: dict[int, float] = {}
    for c in classes:
        records: list[tuple[float, int, int]] = []  # (score, image, detection index)
        gts: list[Tensor] = []
        n_gt = 0
        for i, (p, t) in enumerate(zip(preds, targets)):
            g = t["boxes"][t["labels"] == c].reshape(-1, 4)
            gts.append(g)
            n_gt += g.shape[0]
            keep = (p["labels"] == c).nonzero().reshape(-1)
            records += [(float(p["scores"][j]), i, int(j)) for j in keep.tolist()]
        # Stable sort: equal scores keep image order, as a stable argsort would.
        records.sort(key=lambda r: -r[0])
        matched = [torch.zeros(g.shape[0], dtype=torch.bool) for g in gts]
        tp = torch.zeros(len(records))
        for n, (_, i, j) in enumerate(records):
            g = gts[i]
            if g.shape[0] == 0:
                continue
            ious = box_iou(preds[i]["boxes"][j].reshape(1, 4), g)[0]
            ious[matched[i]] = -1.0
            best = int(torch.argmax(ious))
            if ious[best] >= iou_threshold:
                matched[i][best] = True
                tp[n] = 1.0
        per_class[c] = _precision_envelope_ap(tp, n_gt, interpolation)
    vals = torch.tensor(list(per_class.values()), dtype=torch.float64)
    return {"mAP": _nanmean(vals) if len(vals) else math.nan, "per_class": per_class}


class DetectionAveragePrecision:
    """Accumulates per-image detections and ground truth; ``compute`` gives mAP at the IoU."""

    def __init__(self, iou_threshold: float = 0.5, interpolation: str = "coco101"):
        self.iou_threshold = iou_threshold
        self.interpolation = interpolation
        self.preds: list[dict] = []
        self.targets: list[dict] = []

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        for p, t in zip(preds, targets, strict=True):
            self.preds.append({k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")})
            self.targets.append({k: t[k].detach().cpu() for k in ("boxes", "labels")})

    def compute(self) -> dict:
        return detection_average_precision(
            self.preds, self.targets, self.iou_threshold, self.interpolation
        )

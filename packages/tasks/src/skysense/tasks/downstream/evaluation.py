"""Evaluation of a task model: the metrics of its kind on held-out data, and the predictions the
plots show.

Dense kinds (segmentation, change) are evaluated on whole scenes by sliding windows with
blending (:mod:`sliding`), the way `skysense infer` predicts, so a score is that of the full
scene rather than of crops.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from skysense.tasks.downstream import metrics as M
from skysense.tasks.downstream.datasets.common import IGNORE_INDEX, SPATIAL_KEYS, collate, to_device
from skysense.tasks.downstream.sliding import WindowGrid, predict_region

log = logging.getLogger(__name__)


def window_of(sample: Mapping, top: int, left: int, size: int, ref_width: int) -> dict:
    """The ``size`` window at (top, left) of the reference grid of an in-memory sample (nested
    for change pairs), zero-padded (and marked invalid) beyond the scene's edge."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, dict):
            out[k] = window_of(v, top, left, size, ref_width)
        elif k in SPATIAL_KEYS and k != "mask" and isinstance(v, Tensor):
            f = v.shape[-1] // ref_width
            x = v[..., top * f : (top + size) * f, left * f : (left + size) * f]
            ph, pw = size * f - x.shape[-2], size * f - x.shape[-1]
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
            out[k] = x
        else:
            out[k] = v
    return out


def probabilities(model: nn.Module, kind: str, batch: Mapping, size: int) -> Tensor:
    """(B, n_out, size, size): class probabilities per pixel (classification kinds broadcast
    their per-window probabilities over the window)."""
    logits = model(batch)["logits"]
    if kind == "multilabel":
        p = torch.sigmoid(logits)
    else:
        p = torch.softmax(logits, 1)
    if p.ndim == 2:
        p = p[:, :, None, None].expand(-1, -1, size, size)
    return p


@torch.no_grad()
def predict_scene(
    model: nn.Module,
    kind: str,
    sample: Mapping,
    height: int,
    width: int,
    n_out: int,
    window: int,
    overlap: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(n_out, H, W) blended probabilities over a whole in-memory scene."""
    grid = WindowGrid(height, width, window, overlap)

    def predict(chunk):
        batch = collate([window_of(sample, t, left, window, width) for t, left in chunk])
        return probabilities(model, kind, to_device(batch, device), window)

    return predict_region(predict, grid, (0, height, 0, width), n_out, batch_size)


def evaluate_dense(
    model: nn.Module,
    kind: str,
    scenes: Sequence,
    n_classes: int,
    window: int,
    overlap: int,
    batch_size: int = 8,
    device="cpu",
    threshold: float | None = None,
) -> tuple[dict, Tensor, list[Tensor]]:
    """Segmentation / change scores over whole scenes. ``threshold``: change models predict
    change where P(change) >= threshold (None: argmax, i.e. 0.5). Returns (scores, confusion
    matrix, per-scene predicted class maps)."""
    model.eval()
    cm = M.ConfusionMatrix(n_classes, ignore_index=IGNORE_INDEX)
    preds = []
    per_scene = {}
    for s in tqdm(scenes, desc="evaluate", unit="scene", leave=False):
        h, w = s.mask.shape
        prob = predict_scene(
            model, kind, s.sample, h, w, n_classes, window, overlap, batch_size, device
        )
        if kind == "change" and threshold is not None:
            pred = (prob[1] >= threshold).long()
        else:
            pred = prob.argmax(0)
        cm.update(pred, s.mask)
        preds.append(pred)
        # per-scene (per-city) scores beside the pooled ones
        one = M.confusion_matrix(pred, s.mask, n_classes, IGNORE_INDEX)
        sc = M.segmentation_scores(one)
        if kind == "change":
            sc.update({f"change_{k}": v for k, v in M.binary_scores(one, positive=1).items()})
            sc["predicted_change_share"] = float((pred[s.mask != IGNORE_INDEX] == 1).float().mean())
            sc["true_change_share"] = float((s.mask[s.mask != IGNORE_INDEX] == 1).float().mean())
        per_scene[str(s.name)] = sc
    mat = cm.compute()
    scores = M.segmentation_scores(mat)
    if kind == "change":
        scores.update({f"change_{k}": v for k, v in M.binary_scores(mat, positive=1).items()})
    scores["per_class_IoU"] = M.per_class_iou(mat).tolist()
    scores["per_class_F1"] = M.per_class_f1(mat).tolist()
    scores["per_scene"] = per_scene
    if kind == "change":
        scores["threshold"] = 0.5 if threshold is None else float(threshold)
    return scores, mat, preds


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, kind: str, batches: Iterable[Mapping], n_classes: int, device="cpu"
) -> tuple[dict, dict]:
    """OA + confusion matrix (single-label) or mAP (multi-label). Returns (scores, extras with
    ``cm`` or the per-class APs, and the collected ``scores``/``targets``)."""
    model.eval()
    if kind == "classification":
        cm = M.ConfusionMatrix(n_classes)
        probs, targets = [], []
        for b in batches:
            b = to_device(b, device)
            p = torch.softmax(model(b)["logits"], 1).cpu()
            cm.update(p.argmax(1), b["label"].cpu())
            probs.append(p)
            targets.append(b["label"].cpu())
        mat = cm.compute()
        scores = {"OA": M.overall_accuracy(mat), "mF1": M.segmentation_scores(mat)["mF1"]}
        return scores, {"cm": mat, "scores": torch.cat(probs), "targets": torch.cat(targets)}
    ap = M.MultilabelAveragePrecision(n_classes)
    probs, targets = [], []
    for b in batches:
        b = to_device(b, device)
        p = torch.sigmoid(model(b)["logits"]).cpu()
        ap.update(p, b["label"].cpu())
        probs.append(p)
        targets.append(b["label"].cpu())
    out = ap.compute()
    per = out.pop("per_class_AP")
    out["per_class_AP"] = per.tolist()
    return out, {"scores": torch.cat(probs), "targets": torch.cat(targets)}


@torch.no_grad()
def evaluate_detection(model: nn.Module, scenes: Sequence, device="cpu") -> tuple[dict, list[dict]]:
    """mAP50 (COCO 101-point) and VOC all-point AP50 over whole held-out scenes."""
    model.eval()
    acc = M.DetectionAveragePrecision(0.5, "coco101")
    preds = []
    for s in scenes:
        out = model([s.hr.to(device)])[0]
        out = {k: v.cpu() for k, v in out.items()}
        acc.update([out], [{"boxes": s.boxes, "labels": s.labels}])
        preds.append(out)
    res = acc.compute()
    voc = M.detection_average_precision(acc.preds, acc.targets, 0.5, "all")
    scores = {
        "mAP50": res["mAP"],
        "mAP50_voc": voc["mAP"],
        "per_class_AP50": {str(k): v for k, v in res["per_class"].items()},
        "n_predictions": int(sum(len(p["boxes"]) for p in preds)),
        "n_ground_truth": int(sum(len(s.boxes) for s in scenes)),
    }
    if scenes and all(getattr(s, "polygons", None) is not None for s in scenes):
        scores.update(_rotated_scores(preds, scenes))
    return scores, preds


def _rotated_scores(preds: Sequence[dict], scenes: Sequence) -> dict:
    """Rotated-box AP50 (DOTA-style, all-point) of oriented datasets (DIOR-R, FAIR1M): the
    detector's rotated boxes (``polygons`` (N, 8), from the oriented head) against the oriented
    ground truth; a horizontal detector's boxes enter as 4-corner polygons (a lower bound)."""
    import numpy as np

    from skysense.data.datasets.oriented import rotated_map

    def corners(b: Tensor) -> np.ndarray:
        x0, y0, x1, y1 = b.numpy().T.reshape(4, -1)
        return np.stack([x0, y0, x1, y0, x1, y1, x0, y1], axis=1)

    p = [
        {
            "polygons": (
                o["polygons"].numpy().reshape(-1, 8) if "polygons" in o else corners(o["boxes"])
            ),
            "scores": o["scores"].numpy(),
            "labels": o["labels"].numpy(),
        }
        for o in preds
    ]
    t = [{"polygons": np.asarray(s.polygons), "labels": np.asarray(s.labels)} for s in scenes]
    res = rotated_map(p, t, 0.5, "all")
    return {
        "rotated_mAP50": res["mAP"],
        "rotated_per_class_AP50": {str(k): v for k, v in res["per_class"].items()},
    }

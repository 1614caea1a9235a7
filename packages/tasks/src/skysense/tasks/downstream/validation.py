"""Scores on the validation split that :mod:`holdout` carves from the training data: what early
stopping compares, and change detection's decision threshold.

- :func:`score_fn`: ``model -> float``, higher is better: the task's headline metric on the
  validation split (``metric="score"``): OA (classification), mAP (multi-label), mIoU
  (segmentation), mAP50 (detection; rotated-box mAP50 on oriented data), and for change
  detection the change F1 at the best threshold on that split (threshold-free: the threshold
  is chosen once more at the end); or, for image tasks, minus
  the mean validation loss (``metric="loss"``: cross-entropy / binary cross-entropy of the
  predicted probabilities), which moves smoothly where a handful of validation images make
  the accuracy jump in steps of 1/N.
- :func:`choose_threshold`: P(change) over the labelled pixels of the validation scenes, the
  threshold of the best change F1 (0.01 .. 0.99, the benchmark's
  :func:`skysense.tasks.benchmark.probes.best_threshold`), and the precision/recall curve
  written as ``pr_curve.json`` and ``pr_curve.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX, collate
from skysense.tasks.downstream.evaluation import (
    evaluate_classification,
    evaluate_dense,
    evaluate_detection,
    predict_scene,
)


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


def _change_pv(model, val, ev, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = change_probs(model, val.eval, ev, device)
    return torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows])


def f1_at(p: torch.Tensor, y: torch.Tensor, t: float) -> float:
    """F1 of the positive class of ``p`` (N,) >= ``t`` against ``y`` (N,) in {0, 1}."""
    pred, pos = p >= t, y.bool()
    denom = pred.sum().item() + pos.sum().item()
    return 2 * (pred & pos).sum().item() / denom if denom else math.nan


def score_fn(kind: str, val, cfg, device, metric: str = "score") -> Callable[[nn.Module], float]:
    """The validation score of ``kind`` on ``val`` (a :class:`TaskData` of the validation
    split); ``cfg``: the finetune config (task.eval, trainer.eval_batch_size); ``metric``:
    "score" or "loss" (image tasks only; module docstring)."""
    if metric not in ("score", "loss"):
        raise ValueError(f"trainer.val_metric must be score or loss, not {metric!r}")
    if metric == "loss" and kind not in ("classification", "multilabel"):
        raise NotImplementedError(f"trainer.val_metric=loss for {kind} (image tasks only)")
    from skysense.tasks.benchmark.probes import best_threshold

    ev = cfg.task.eval

    def score(model: nn.Module) -> float:
        if kind == "change":
            p, y = _change_pv(model, val, ev, device)
            return f1_at(p, y, best_threshold(p, y))
        if kind == "segmentation":
            s, _, _ = evaluate_dense(model, kind, val.eval, len(val.classes), ev.window,
                                     ev.overlap, ev.batch_size, device)  # fmt: skip
            return float(s["mIoU"])
        if kind in ("classification", "multilabel"):
            bs = int(cfg.trainer.eval_batch_size)
            if val.eval_batches is not None:
                batches = val.eval_batches(bs)
            else:
                batches = DataLoader(val.eval, batch_size=bs, collate_fn=collate)
            s, extra = evaluate_classification(model, kind, batches, len(val.classes), device)
            if metric == "loss":
                return -mean_loss(kind, extra["scores"], extra["targets"])
            return float(s["OA" if kind == "classification" else "mAP"])
        if kind == "detection":  # rotated-box mAP50 where the data carry oriented boxes
            s, _ = evaluate_detection(model, val.eval, device)
            return float(s.get("rotated_mAP50", s["mAP50"]))
        raise NotImplementedError(f"a validation score of {kind} models")

    return score


def mean_loss(kind: str, probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy of softmax ``probs`` (N, K) at ``targets`` (N,), or mean binary
    cross-entropy of sigmoid ``probs`` (N, K) against ``targets`` (N, K) {0, 1}."""
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    if kind == "classification":
        return float(-p.gather(1, targets.long()[:, None]).log().mean())
    y = targets.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def choose_threshold(model: nn.Module, val, ev, device, out_dir: Path | None = None) -> dict:
    """``{"threshold", "val_F1", "val_pr_curve", "val_scenes", "files"}`` of a change model on
    the validation scenes; the curve goes to ``out_dir/pr_curve.{json,png}`` when given."""
    from skysense.tasks.benchmark.probes import best_threshold, pr_curve

    model.eval()
    p, y = _change_pv(model, val, ev, device)
    t = best_threshold(p, y)
    curve = pr_curve(p, y)
    res = {"threshold": t, "val_F1": f1_at(p, y, t), "val_pr_curve": curve,
           "val_scenes": [str(s.name) for s in val.eval],
           "val_change_share": float(y.float().mean()) if len(y) else math.nan}  # fmt: skip
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pr_curve.json").write_text(json.dumps(
            {k: v for k, v in res.items() if k != "files"}, indent=1, default=str))  # fmt: skip
        res["files"] = {"pr_curve_json": str(out_dir / "pr_curve.json"),
                        "pr_curve_png": str(plot_pr(curve, t, out_dir / "pr_curve.png"))}  # fmt: skip
    return res


def plot_pr(curve: dict, threshold: float, path: Path) -> Path:
    """Precision against recall over the thresholds, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, pr, rc = curve["threshold"], curve["precision"], curve["recall"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(rc, pr, "-", color="C0")
    i = min(range(len(ts)), key=lambda j: abs(ts[j] - threshold))
    ax.plot([rc[i]], [pr[i]], "o", color="C3", label=f"chosen threshold {threshold:.2f}")
    ax.set_xlabel("recall (change)")
    ax.set_ylabel("precision (change)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("validation split: precision / recall of P(change)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

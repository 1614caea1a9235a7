"""Figures a person can read: loss curves, confusion matrices, prediction overlays.

Every function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_losses(histories: dict[str, list[dict]], path, title: str = "training loss") -> Path:
    """One curve per run (e.g. pre-trained vs random initialisation), with a running mean."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, hist in histories.items():
        steps = np.array([h["step"] for h in hist])
        loss = np.array([h["loss"] for h in hist])
        (line,) = ax.plot(steps, loss, alpha=0.3, lw=1)
        k = max(1, len(loss) // 15)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color=line.get_color(), lw=2, label=f"{name} (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion(cm, classes: Sequence[str], path, title: str = "confusion matrix") -> Path:
    """Rows = true class, columns = predicted; colours = row-normalised, text = counts."""
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, np.maximum(rows, 1))
    side = min(12, 2.2 + 0.55 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}",
                ha="center",
                va="center",
                fontsize=8 if k > 8 else 10,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    names = [c if len(c) <= 18 else c[:16] + ".." for c in classes]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return _save(fig, path)


def _change_overlay(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3): true positives white, false positives red, false negatives blue, ignored
    grey, true negatives black."""
    out = np.zeros((*truth.shape, 3), np.float32)
    tp = (truth == 1) & (pred == 1)
    fp = (truth == 0) & (pred == 1)
    fn = (truth == 1) & (pred == 0)
    out[tp] = (1, 1, 1)
    out[fp] = (1, 0.15, 0.15)
    out[fn] = (0.2, 0.45, 1)
    out[truth == IGNORE_INDEX] = (0.35, 0.35, 0.35)
    return out


def plot_dense_predictions(
    scenes: Sequence,
    preds: Sequence,
    path,
    kind: str,
    classes: Sequence[str],
    n: int | None = None,
    title: str = "",
) -> Path:
    """For every scene (or the first ``n``): the image(s), the ground truth and the prediction.

    Change: date 1, date 2, truth, and errors (white TP, red FP, blue FN). Segmentation: the
    image, the truth and the prediction in one colour per class (grey = ignored)."""
    scenes, preds = list(scenes)[:n], list(preds)[:n]
    cols = 4 if kind == "change" else 3
    fig, axes = plt.subplots(
        len(scenes), cols, figsize=(3.3 * cols, 3.3 * len(scenes)), squeeze=False
    )
    cmap = plt.get_cmap("tab20", max(len(classes), 2))
    for r, (s, p) in enumerate(zip(scenes, preds)):
        truth = s.mask.numpy()
        pred = np.asarray(p)
        if kind == "change":
            imgs = [(s.rgb[0], "date 1"), (s.rgb[1], "date 2")] if s.rgb is not None else []
            for c, (im, t) in enumerate(imgs):
                axes[r, c].imshow(im)
                axes[r, c].set_title(f"{s.name}: {t}")
            t = np.where(truth == IGNORE_INDEX, 0.35, truth.astype(np.float32))
            axes[r, 2].imshow(t, cmap="gray", vmin=0, vmax=1)
            axes[r, 2].set_title("true change")
            axes[r, 3].imshow(_change_overlay(truth, pred))
            tp = int(((truth == 1) & (pred == 1)).sum())
            fp = int(((truth == 0) & (pred == 1)).sum())
            fn = int(((truth == 1) & (pred == 0)).sum())
            f1 = 2 * tp / max(1, 2 * tp + fp + fn)
            axes[r, 3].set_title(f"pred: TP {tp} FP {fp} FN {fn}, F1 {f1:.2f}", fontsize=8)
        else:
            if s.rgb is not None:
                axes[r, 0].imshow(s.rgb)
            axes[r, 0].set_title(s.name)
            t = np.ma.masked_equal(truth, IGNORE_INDEX)
            axes[r, 1].imshow(
                t, cmap=cmap, vmin=0, vmax=max(len(classes), 2) - 1, interpolation="nearest"
            )
            axes[r, 1].set_title("truth")
            axes[r, 2].imshow(
                pred, cmap=cmap, vmin=0, vmax=max(len(classes), 2) - 1, interpolation="nearest"
            )
            acc = (
                float((pred[truth != IGNORE_INDEX] == truth[truth != IGNORE_INDEX]).mean())
                if (truth != IGNORE_INDEX).any()
                else math.nan
            )
            axes[r, 2].set_title(f"prediction (pixel acc. {acc:.2f})")
        for a in axes[r]:
            a.axis("off")
    if kind != "change":
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(classes))]
        fig.legend(handles, classes, loc="lower center", ncol=min(6, len(classes)), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_detections(
    scenes: Sequence,
    preds: Sequence[dict],
    path,
    classes: Sequence[str],
    score_threshold: float = 0.3,
    title: str = "",
) -> Path:
    """Each scene with its true boxes (green) and predictions scoring above the threshold
    (red, with the score)."""
    h, w = scenes[0].rgb.shape[:2]
    side = 9.0
    fig, axes = plt.subplots(
        1, len(scenes), figsize=(len(scenes) * max(4.0, side * w / h), side), squeeze=False
    )
    for a, s, p in zip(axes[0], scenes, preds):
        a.imshow(s.rgb)
        for b in s.boxes.tolist():
            a.add_patch(
                plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5)
            )
        keep = p["scores"] >= score_threshold
        for b, sc in zip(p["boxes"][keep].tolist(), p["scores"][keep].tolist()):
            a.add_patch(
                plt.Rectangle(
                    (b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=1.2, ls="--"
                )
            )
            a.text(b[0], b[1] - 1, f"{sc:.2f}", color="red", fontsize=6)
        a.set_title(
            f"{s.name}: {len(s.boxes)} true (green), {int(keep.sum())} predicted >= {score_threshold} (red)",
            fontsize=8,
        )
        a.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_multilabel(
    per_class_ap: Sequence[float], classes: Sequence[str], probs, targets, path, title: str = ""
) -> Path:
    """Left: AP per class (classes without a positive are marked n/a). Right: per sample, the
    true labels and the predicted probabilities (a heat map, true labels boxed)."""
    probs, targets = np.asarray(probs), np.asarray(targets)
    k = len(classes)
    fig, (a1, a2) = plt.subplots(
        1, 2, figsize=(13, 0.35 * k + 2.5), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    ap = np.array(per_class_ap, dtype=np.float64)
    y = np.arange(k)
    a1.barh(y, np.nan_to_num(ap), color=["tab:blue" if np.isfinite(v) else "lightgrey" for v in ap])
    for i, v in enumerate(ap):
        a1.text(
            0.01 if not np.isfinite(v) else v + 0.01,
            i,
            "n/a" if not np.isfinite(v) else f"{v:.2f}",
            va="center",
            fontsize=7,
        )
    a1.set_yticks(y, classes, fontsize=7)
    a1.set_xlim(0, 1.1)
    a1.invert_yaxis()
    a1.set_xlabel("average precision")
    a1.set_title("AP per class (n/a: no positive in the evaluation set)", fontsize=9)
    im = a2.imshow(probs.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(targets.T > 0.5)):
        a2.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    a2.set_yticks(y, classes, fontsize=7)
    a2.set_xticks(range(probs.shape[0]))
    a2.set_xlabel("evaluation sample")
    a2.set_title("predicted probability (red boxes: true labels)", fontsize=9)
    fig.colorbar(im, ax=a2, fraction=0.04)
    if title:
        fig.suptitle(title)
    return _save(fig, path)

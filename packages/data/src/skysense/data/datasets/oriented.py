"""Oriented (rotated) boxes: polygons of 4 corners, their IoU and the rotated-box mAP that DOTA,
DIOR-R and FAIR1M report.

A box is (8,) float ``x1 y1 x2 y2 x3 y3 x4 y4`` in pixels, corners in order around the box. The
IoU of two convex quadrilaterals is computed exactly: the intersection polygon by clipping one
with the other (Sutherland-Hodgman), areas by the shoelace formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def polygon_area(p: np.ndarray) -> float:
    """Area of a simple polygon (K, 2)."""
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _ccw(p: np.ndarray) -> np.ndarray:
    x, y = p[:, 0], p[:, 1]
    signed = float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return p if signed >= 0 else p[::-1]


def _clip(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """``subject`` clipped by the convex counter-clockwise polygon ``clip``."""
    out = subject
    n = len(clip)
    for i in range(n):
        if len(out) == 0:
            break
        a, b = clip[i], clip[(i + 1) % n]
        edge = b - a

        def inside(q, a=a, edge=edge):
            return edge[0] * (q[1] - a[1]) - edge[1] * (q[0] - a[0]) >= -1e-12

        def cross(p, q, a=a, b=b):
            d1, d2 = q - p, b - a
            den = d1[0] * d2[1] - d1[1] * d2[0]
            if abs(den) < 1e-15:
                return p
            t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / den
            return p + t * d1

        pts, prev = [], out[-1]
        for cur in out:
            if inside(cur):
                if not inside(prev):
                    pts.append(cross(prev, cur))
                pts.append(cur)
            elif inside(prev):
                pts.append(cross(prev, cur))
            prev = cur
        out = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return out


def polygon_iou(a, b) -> float:
    """IoU of two convex quadrilaterals given as (8,) corner coordinates."""
    pa = _ccw(np.asarray(a, np.float64).reshape(4, 2))
    pb = _ccw(np.asarray(b, np.float64).reshape(4, 2))
    inter = polygon_area(_clip(pa, pb))
    union = polygon_area(pa) + polygon_area(pb) - inter
    return inter / union if union > 0 else 0.0


def envelope(polys: np.ndarray) -> np.ndarray:
    """(M, 8) corners -> (M, 4) enclosing horizontal boxes x0 y0 x1 y1."""
    p = np.asarray(polys, np.float32).reshape(-1, 4, 2)
    return np.concatenate([p.min(1), p.max(1)], 1)


def _ap(tp: np.ndarray, n_gt: int, metric: str) -> float:
    if n_gt == 0:
        return math.nan
    if len(tp) == 0:
        return 0.0
    tpc, fpc = np.cumsum(tp), np.cumsum(1 - tp)
    rec, prec = tpc / n_gt, tpc / np.maximum(tpc + fpc, 1e-12)
    if metric == "voc07":
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))  # fmt: skip
    env = np.maximum.accumulate(prec[::-1])[::-1]
    r = np.concatenate([[0.0], rec])
    return float(np.sum((r[1:] - r[:-1]) * env))


def rotated_map(
    preds: Sequence[dict], targets: Sequence[dict], iou_threshold: float = 0.5, metric="all"
) -> dict:
    """Rotated-box mAP.

    Args:
        preds: per image ``{"polygons": (N, 8), "scores": (N,), "labels": (N,)}``.
        targets: per image ``{"polygons": (M, 8), "labels": (M,)}``.
        metric: ``all`` (all-point interpolation) or ``voc07`` (11 points, DOTA's devkit).
    Returns:
        ``{"mAP": float, "per_class": {label: AP}}`` over the classes with ground truth.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction entries for {len(targets)} target entries")
    classes = sorted({int(c) for t in targets for c in np.asarray(t["labels"]).reshape(-1)})
    per_class = {}
    for c in classes:
        recs, gts, n_gt = [], [], 0
        for i, (p, t) in enumerate(zip(preds, targets)):
            g = np.asarray(t["polygons"]).reshape(-1, 8)[np.asarray(t["labels"]) == c]
            gts.append(g)
            n_gt += len(g)
            pl = np.asarray(p["labels"]).reshape(-1)
            for j in np.flatnonzero(pl == c):
                recs.append((float(np.asarray(p["scores"])[j]), i, int(j)))
        recs.sort(key=lambda r: -r[0])
        used = [np.zeros(len(g), bool) for g in gts]
        tp = np.zeros(len(recs))
        for n, (_, i, j) in enumerate(recs):
            g = gts[i]
            if not len(g):
                continue
            box = np.asarray(preds[i]["polygons"]).reshape(-1, 8)[j]
            ious = np.array([polygon_iou(box, q) for q in g])
            ious[used[i]] = -1.0
            k = int(np.argmax(ious))
            if ious[k] >= iou_threshold:
                used[i][k], tp[n] = True, 1.0
        per_class[c] = _ap(tp, n_gt, metric)
    vals = [v for v in per_class.values() if not math.isnan(v)]
    return {"mAP": float(np.mean(vals)) if vals else math.nan, "per_class": per_class}

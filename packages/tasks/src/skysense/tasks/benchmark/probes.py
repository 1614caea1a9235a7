"""Probes on frozen features: logistic regression solved to convergence, and k-nearest
neighbours, with what they are scored by.

Problems (``kind``):

- ``classification`` / ``pixels``: one class per row, ``y`` (N,) int64; multinomial logistic
  regression; scores OA, mF1, mIoU (``pixels`` is per-pixel classification: headline mIoU).
- ``change``: binary per pixel, ``y`` (N,) int64 in {0, 1}; the same two-class regression, the
  decision threshold on P(change) chosen on the validation rows (best F1 of the change class);
  scores change F1 / precision / recall / IoU at that threshold, and the precision-recall curve
  of the validation rows.
- ``multilabel``: ``y`` (N, K) {0, 1} float; one logistic regression per label (sigmoid);
  scores mAP (macro) and micro mAP.

Logistic regression minimises ``mean loss + l2 * ||W||^2`` (bias not penalised) on standardised
features in float64 with full-batch L-BFGS (strong Wolfe line search) until the gradient's
largest entry is below ``tol`` (the run records whether it got there: ``converged``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from skysense.tasks.downstream import metrics as M

HEADLINE = {"classification": "OA", "pixels": "mIoU", "change": "change_F1", "multilabel": "mAP"}
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std (clamped at 1e-6) of the rows of ``x`` (N, D)."""
    return x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])


def _loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor, l2: float, multilabel: bool) -> Tensor:
    z = x @ w.T + b
    if multilabel:
        data = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(x)
    else:
        data = F.cross_entropy(z, y)
    return data + l2 * w.pow(2).sum()


def fit_logistic(
    x: Tensor,
    y: Tensor,
    n_out: int,
    l2: float,
    multilabel: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> dict:
    """Logistic regression on ``x`` (N, D) (already standardised), float64.

    Returns:
        ``{"weight": (n_out, D), "bias": (n_out,), "loss", "grad_max", "iterations",
        "converged"}``.
    """
    x = x.double()
    y = y.double() if multilabel else y.long()
    w = torch.zeros(n_out, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _loss(w, b, x, y, l2, multilabel)
        loss.backward()
        return loss

    opt.step(closure)
    loss = closure()
    g = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    return {
        "weight": w.detach(),
        "bias": b.detach(),
        "loss": loss.item(),
        "grad_max": g,
        "iterations": int(iters),
        "converged": bool(g < tol * 10),
    }


def predict_logistic(model: dict, x: Tensor, multilabel: bool = False) -> Tensor:
    """(N, n_out) probabilities (softmax, or sigmoid for multi-label), float32."""
    z = x.double() @ model["weight"].T + model["bias"]
    return (torch.sigmoid(z) if multilabel else torch.softmax(z, 1)).float()


def knn_scores(
    x_train: Tensor,
    y_train: Tensor,
    x: Tensor,
    n_out: int,
    k: int = 20,
    temperature: float = 0.07,
    multilabel: bool = False,
    chunk: int = 4096,
) -> Tensor:
    """(N, n_out) class scores of a weighted k-NN vote on cosine similarity: each of the ``k``
    nearest training rows votes ``exp(sim / temperature)`` for its class (multi-label: for each
    of its labels); the scores are normalised to sum to 1 per row (multi-label: divided by the
    sum of the weights, so a score is the weighted share of neighbours carrying the label)."""
    a = F.normalize(x_train.float(), dim=1)
    onehot = y_train.float() if multilabel else F.one_hot(y_train.long(), n_out).float()
    k = min(k, len(a))
    out = []
    for i in range(0, len(x), chunk):
        q = F.normalize(x[i : i + chunk].float(), dim=1)
        sim, idx = (q @ a.T).topk(k, dim=1)
        w = torch.exp((sim - 1.0) / temperature)  # shifted by the maximum possible similarity
        votes = (w[..., None] * onehot[idx]).sum(1)
        out.append(votes / w.sum(1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, n_out)


def pr_curve(p: Tensor, y: Tensor, n: int = 101) -> dict:
    """Precision and recall of the positive class at ``n`` thresholds 0..1 of ``p`` (N,)."""
    ts = torch.linspace(0, 1, n)
    pos = y.bool()
    prec, rec = [], []
    for t in ts:
        pred = p >= t
        tp = (pred & pos).sum().item()
        fp = (pred & ~pos).sum().item()
        fn = (~pred & pos).sum().item()
        prec.append(tp / (tp + fp) if tp + fp else math.nan)
        rec.append(tp / (tp + fn) if tp + fn else math.nan)
    return {"threshold": ts.tolist(), "precision": prec, "recall": rec}


def best_threshold(p: Tensor, y: Tensor) -> float:
    """The threshold on ``p`` (N,) of the highest F1 of the positive class over 0.01..0.99."""
    best, best_f1 = 0.5, -1.0
    pos = y.bool()
    for t in torch.linspace(0.01, 0.99, 99):
        pred = p >= t
        tp = (pred & pos).sum().item()
        f1 = 2 * tp / (pred.sum().item() + pos.sum().item()) if pos.any() or pred.any() else 0.0
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def score(kind: str, probs: Tensor, y: Tensor, n_classes: int, threshold: float = 0.5) -> dict:
    """The metrics of ``kind`` (module docstring) for ``probs`` (N, n_out) against ``y``."""
    if kind == "multilabel":
        return {
            "mAP": float(M.multilabel_average_precision(probs, y.float(), "macro")),
            "mAP_micro": float(M.multilabel_average_precision(probs, y.float(), "micro")),
        }
    if kind == "change":
        pred = (probs[:, 1] >= threshold).long()
        cm = M.confusion_matrix(pred, y, 2)
        out = {f"change_{k}": v for k, v in M.binary_scores(cm, 1).items()}
        out["threshold"] = threshold
        out["predicted_change_share"] = float(pred.float().mean()) if len(pred) else math.nan
        out["true_change_share"] = float(y.float().mean()) if len(y) else math.nan
        return out
    cm = M.confusion_matrix(probs.argmax(1), y, n_classes)
    seg = M.segmentation_scores(cm)
    return {
        "OA": M.overall_accuracy(cm),
        "mF1": seg["mF1"],
        "mIoU": seg["mIoU"],
        "per_class_IoU": M.per_class_iou(cm).tolist(),
        "confusion_matrix": cm.tolist(),
    }


def headline(kind: str, scores: dict) -> float:
    v = scores.get(HEADLINE[kind], math.nan)
    return math.nan if v is None else float(v)


def n_outputs(kind: str, y: Tensor, n_classes: int) -> int:
    return y.shape[1] if kind == "multilabel" else (2 if kind == "change" else n_classes)


def run_probe(
    method: str,
    kind: str,
    n_classes: int,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    l2_grid=L2_GRID,
    k: int = 20,
    max_iter: int = 1000,
) -> dict:
    """Fit ``method`` ("linear" or "knn") on ``train``, choose the L2 weight (linear) and the
    change threshold on ``val``, score on ``test``. Each split is (x (N, D) float, y).
    Returns the test scores (``test``), the sweep, convergence, and ``test_probs`` (N, n_out)."""
    ml = kind == "multilabel"
    n_out = n_outputs(kind, train[1], n_classes)
    mu, sd = standardiser(train[0])
    xt, xv, xs = ((s[0] - mu) / sd for s in (train, val, test))
    out: dict = {"method": method, "n_train": len(xt), "n_val": len(xv), "n_test": len(xs)}
    if method == "linear":
        sweep, best = [], None
        for l2 in l2_grid:
            m = fit_logistic(xt, train[1], n_out, l2, ml, max_iter)
            pv = predict_logistic(m, xv, ml)
            t = best_threshold(pv[:, 1], val[1]) if kind == "change" else 0.5
            v = headline(kind, score(kind, pv, val[1], n_classes, t))
            sweep.append({"l2": l2, "val": v, "iterations": m["iterations"],
                          "converged": m["converged"], "grad_max": m["grad_max"]})  # fmt: skip
            if best is None or (not math.isnan(v) and (math.isnan(best[0]) or v >= best[0])):
                best = (v, l2, m, t, pv)
        v, l2, m, t, pv = best
        ptest = predict_logistic(m, xs, ml)
        out.update(l2=l2, sweep=sweep, converged=m["converged"], iterations=m["iterations"])
    elif method == "knn":
        pv = knn_scores(xt, train[1], xv, n_out, k, multilabel=ml)
        t = best_threshold(pv[:, 1], val[1]) if kind == "change" else 0.5
        v = headline(kind, score(kind, pv, val[1], n_classes, t))
        ptest = knn_scores(xt, train[1], xs, n_out, k, multilabel=ml)
        out.update(k=min(k, len(xt)), converged=True)
    else:
        raise ValueError(f"probe method must be linear or knn, not {method!r}")
    out["val_score"] = v
    out["test"] = score(kind, ptest, test[1], n_classes, t)
    out["test_probs"] = ptest
    if kind == "change":
        out["val_pr_curve"] = pr_curve(pv[:, 1], val[1])
    return out


def stratified_subset(y: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a ``fraction`` of the rows, per class (at least one row of each class; for
    multi-label or fraction >= 1: a plain random subset / everything)."""
    n = len(y)
    if fraction >= 1.0:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    if y.ndim > 1:
        return torch.randperm(n, generator=g)[: max(1, round(fraction * n))].sort().values
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        keep.append(idx[: max(1, round(fraction * len(idx)))])
    return torch.cat(keep).sort().values


def split_validation(y: Tensor, groups: Tensor | None, fraction: float, seed: int):
    """(train indices, val indices): whole groups (scenes, blocks) held out when ``groups`` has
    more than one, a ``fraction`` of them chosen by ``seed``; else a stratified ``fraction``."""
    n = len(y)
    if groups is not None and len(torch.unique(groups)) > 1:
        ids = torch.unique(groups)
        g = torch.Generator().manual_seed(seed)
        ids = ids[torch.randperm(len(ids), generator=g)]
        n_val = max(1, round(fraction * len(ids)))
        val = torch.isin(groups, ids[:n_val])
    else:
        val = torch.zeros(n, dtype=torch.bool)
        val[stratified_subset(y, fraction, seed + 7919)] = True
        if val.all():
            val[0] = False
    return torch.nonzero(~val).flatten(), torch.nonzero(val).flatten()

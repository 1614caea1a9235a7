"""The evaluation protocols of a benchmark entry: one function per protocol, each scoring one
model (a checkpoint, the random-init encoder or a baseline) with one seed.

- ``linear_probe``: frozen features (pooled per image, per pixel for dense data) -> logistic
  regression solved to convergence (L-BFGS, float64), the L2 weight picked from ``l2_grid`` on
  a validation split carved from the training rows (whole scenes / blocks for dense data); the
  change threshold picked on the same validation rows (GEO-Bench's linear probe).
- ``knn``: the same rows, a weighted k-NN vote (k = ``knn_k``, cosine similarity).
- ``finetune``: the existing full fine-tuning with layer-wise lr decay
  (:func:`skysense.tasks.downstream.run.finetune`) with the entry's ``task`` and ``overrides``.
- ``frozen_upernet``: the same path with the encoder frozen (UperNet head of the segmentation
  and change tasks, AdamW lr 1e-4, weight decay 0.05, multi-step lr at 60 % and 90 % of the
  steps (gamma 0.1) after the task's warm-up, sliding-window evaluation; PANGAEA's recipe).
- ``siamese`` (change detection): ``frozen_upernet`` on a change task, whose model is PANGAEA's
  siamese form: one frozen encoder runs over both dates (one batch of twice the size), the
  pyramids of the two dates are fused (concatenation and absolute difference) and decoded by
  UperNet. Any other task kind is an error.
- ``frozen_upernet_ltae`` (series segmentation): ``frozen_upernet`` whose per-date maps of the
  series source (``s2`` / ``s1`` taps) are aggregated by one L-TAE per pyramid level
  (:mod:`skysense.tasks.downstream.temporal`) instead of the mean over the valid dates.

Every protocol returns ``{"score": headline, "metric": name, "plateaued": bool | None,
"scores": {...}, ...}``; the trained ones add ``stop`` (early / budget), ``best_step`` and the
validation curve (:func:`stop_record`). ``label_fraction`` < 1 keeps that share of the training
data, drawn by the seed: probes and image fine-tuning stratified by class, dense fine-tuning
whole scenes / tiles (:mod:`skysense.tasks.downstream.holdout`). Fine-tuning protocols hold
``val_fraction`` of the training data out when early stopping (``eval_every``, ``patience``)
or change detection's threshold (``change_threshold``) needs a validation split.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from skysense.tasks.benchmark import probes

log = logging.getLogger(__name__)

FEATURE_PROTOCOLS = {"linear_probe": "linear", "knn": "knn"}
TRAIN_PROTOCOLS = ("finetune", "frozen_upernet", "siamese", "frozen_upernet_ltae")
PROTOCOLS = (*FEATURE_PROTOCOLS, *TRAIN_PROTOCOLS)


def check_protocol(name: str) -> None:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {list(PROTOCOLS)}")


def per_group_scores(fs, probs, threshold: float) -> dict:
    """Scores of each test scene (``fs.test_group_names``) from the test probabilities."""
    if fs.test_groups is None or not fs.test_group_names:
        return {}
    out = {}
    for i, name in enumerate(fs.test_group_names):
        sel = fs.test_groups == i
        if sel.any():
            s = probes.score(fs.kind, probs[sel], fs.test_y[sel], len(fs.classes), threshold)
            out[name] = {k: v for k, v in s.items() if k != "confusion_matrix"}
    return out


def _fit(entry, kind, n_classes, x, y, groups, test, seed, method, natural=None) -> dict:
    keep = probes.stratified_subset(y, float(entry.label_fraction), seed)
    y = y[keep]
    groups = groups[keep] if groups is not None else None
    tr, va = probes.split_validation(y, groups, float(entry.val_fraction), seed)
    x = x[keep]
    if natural is not None:  # fit on the balanced rows, validate at the true class rates
        natural = natural[keep]
        tr, va = tr[~natural[tr]], va[natural[va]]
    return probes.run_probe(
        method,
        kind,
        n_classes,
        (x[tr], y[tr]),
        (x[va], y[va]),
        test,
        tuple(entry.l2_grid),
        int(entry.knn_k),
        int(entry.max_iter),
    )


def folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint index sets covering the rows: stratified by class for (N,) labels (each
    class dealt round-robin after a seeded shuffle), a seeded random split for multi-label."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    if y.ndim > 1:
        return [perm[f::k].sort().values for f in range(k)]
    order = perm[torch.argsort(y[perm], stable=True)]  # shuffled within each class
    return [order[f::k].sort().values for f in range(k)]


def cross_validated(entry, fs, seed: int, method: str) -> dict:
    """Train and test rows pooled, ``entry.cv_folds`` folds: each row predicted by a probe fit
    (with its own validation split) on the other folds; scored over all rows."""
    if fs.kind not in ("classification", "multilabel"):
        raise ValueError(f"cv_folds applies to image classification, not {fs.kind} data")
    x = torch.cat([fs.train_x, fs.test_x])
    y = torch.cat([fs.train_y, fs.test_y])
    probs, fits = None, []
    for test in folds(y, int(entry.cv_folds), seed):
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        tr = torch.nonzero(train).flatten()
        r = _fit(entry, fs.kind, len(fs.classes), x[tr], y[tr], None, (x[test], y[test]),
                 seed, method)  # fmt: skip
        p = r.pop("test_probs")
        probs = torch.zeros(len(y), p.shape[1]) if probs is None else probs
        probs[test] = p
        fits.append({k: v for k, v in r.items() if k != "test"})
    res = {
        "method": method,
        "cv_folds": int(entry.cv_folds),
        "folds": fits,
        "converged": all(f.get("converged") for f in fits),
        "test": probes.score(fs.kind, probs, y, len(fs.classes)),
    }
    res["test_probs"] = probs
    return res


def probe_protocol(entry, fs, seed: int, method: str) -> dict:
    """``method`` (linear / knn) on a :class:`sources.FeatureSet` with ``seed``'s label subset
    and validation split (or ``entry.cv_folds``-fold cross-validation)."""
    if entry.get("cv_folds"):
        res = cross_validated(entry, fs, seed, method)
        res.pop("test_probs")
        probs = None
    else:
        test = (fs.test_x, fs.test_y)
        res = _fit(entry, fs.kind, len(fs.classes), fs.train_x, fs.train_y, fs.train_groups,
                   test, seed, method, fs.train_natural)  # fmt: skip
        probs = res.pop("test_probs")
    if probs is not None:
        res["per_scene"] = per_group_scores(fs, probs, res["test"].get("threshold", 0.5))
    res["score"] = probes.headline(fs.kind, res["test"])
    res["metric"] = probes.HEADLINE[fs.kind]
    # k-NN has no optimisation to plateau; the linear probe's L-BFGS reached its tolerance or not
    res["plateaued"] = bool(res.get("converged")) if method == "linear" else None
    res["scores"] = res.pop("test")
    return res


def plateaued(losses: list[float], window: float = 0.2, tol: float = 0.05) -> bool | None:
    """Whether a loss curve has flattened: the mean of its last ``window`` share differs from
    the mean of the share before it by less than ``tol`` of the latter (None: too short)."""
    k = max(1, int(len(losses) * window))
    if len(losses) < 2 * k or len(losses) < 4:
        return None
    last, before = float(np.mean(losses[-k:])), float(np.mean(losses[-2 * k : -k]))
    return abs(before - last) <= tol * max(abs(before), 1e-12)


def budget_steps(entry, cfg, seed: int) -> int | None:
    """``entry.epochs`` passes over the training samples the run trains on (those left after the
    validation split and the label fraction carve theirs, ``cfg.trainer``) in optimizer steps,
    clamped to [``min_steps``, ``max_steps``] (None without ``epochs``: the task's
    ``trainer.max_steps``)."""
    if not entry.get("epochs"):
        return None
    from skysense.tasks.downstream.data import build_task_data

    info = build_task_data(cfg.data, 1, seed, cfg.task.get("features")).info
    n = info.get("train")
    n = len(n) if isinstance(n, (list, tuple)) else int(n or 0)
    if n <= 0:
        raise ValueError(f"epochs: the data reports no training sample count ({info})")
    tr = cfg.trainer  # the carve (downstream.holdout): validation share first, then the labels
    n = max(1, round(n * (1.0 - float(tr.val_fraction)) * float(tr.label_fraction)))
    steps = math.ceil(float(entry.epochs) * n / int(cfg.trainer.batch_size))
    return int(min(max(steps, int(entry.min_steps)), int(entry.max_steps)))


def train_over(entry, base_cfg, protocol: str, checkpoint: str | None, seed: int,
               out_dir: Path) -> dict:  # fmt: skip
    """The finetune overrides of a fine-tuning protocol run: seed, run_dir, checkpoint; the
    label fraction; the validation split (``entry.val_fraction``) where early stopping
    (``entry.eval_every`` > 0, ``entry.patience``) or change detection's threshold needs one;
    the frozen protocols' PANGAEA optimiser (AdamW lr 1e-4, wd 0.05, ``entry.schedule``:
    multistep at 60 % and 90 % of the steps by default)."""
    every = int(entry.get("eval_every") or 0)
    change = base_cfg.task.kind == "change"
    thr = change and entry.get("change_threshold", True)
    train = {"label_fraction": float(entry.label_fraction), "eval_every": every,
             "patience": entry.get("patience"), "val_metric": entry.get("val_metric") or "score",
             "val_fraction": float(entry.val_fraction) if every or thr else 0.0}  # fmt: skip
    over = {"seed": seed, "run_dir": str(out_dir), "checkpoint": checkpoint,
            "compare_random_init": False, "trainer": train,
            "task": {"threshold": "val" if thr else "argmax"}}  # fmt: skip
    if protocol in ("frozen_upernet", "siamese", "frozen_upernet_ltae"):
        over["task"]["freeze_encoder"] = True
        over["optim"] = {"lr": 1e-4, "weight_decay": 0.05, "layer_decay": 1.0,
                         "schedule": entry.get("schedule") or "multistep"}  # fmt: skip
    elif entry.get("schedule"):
        over["optim"] = {"schedule": entry.schedule}
    if protocol == "frozen_upernet_ltae":
        over["task"]["temporal"] = "ltae"
    return over


def stop_record(es: dict | None, hist: list[dict]) -> dict:
    """``plateaued`` and ``stop`` of a trained run. With validation: plateaued = the validation
    score had stopped improving by the end (``patience`` evaluations after the best, whether
    that stopped the run early or coincided with the budget's last step; without patience:
    any evaluation after the best); without validation, the loss-curve rule of
    :func:`plateaued`."""
    if not es:
        return {"plateaued": plateaued([h["loss"] for h in hist]), "stop": "budget",
                "best_step": None}  # fmt: skip
    best = es["best_step"]
    after = sum(e["step"] > best for e in es["evals"]) if best is not None else 0
    pat = es.get("patience")
    return {"plateaued": bool(after >= pat if pat else after > 0),
            "stop": "early" if es["stopped_early"] else "budget",
            "best_step": es["best_step"], "budget_steps": es["budget"],
            "val_curve": es["evals"]}  # fmt: skip


def train_protocol(entry, base_cfg, protocol: str, checkpoint: str | None, seed: int,
                   out_dir: Path) -> dict:  # fmt: skip
    """``finetune`` / ``frozen_upernet`` / ``siamese`` / ``frozen_upernet_ltae`` through
    downstream.run.finetune: ``base_cfg`` is the composed finetune config of the entry (task,
    data, overrides)."""
    from skysense.tasks.downstream.run import HEADLINE, finetune

    if protocol == "siamese" and base_cfg.task.kind != "change":
        raise ValueError(f"the siamese protocol is for change detection, not {base_cfg.task.kind}")
    cfg = OmegaConf.merge(base_cfg, train_over(entry, base_cfg, protocol, checkpoint, seed,
                                               out_dir))  # fmt: skip
    budget = budget_steps(entry, cfg, seed)
    if budget is not None:
        cfg.trainer.max_steps = budget
    summary = finetune(cfg)
    run = next(iter(summary["runs"].values()))
    metric = HEADLINE[summary["kind"]][0]
    hist = json.loads((out_dir / run["init"] / "metrics.json").read_text()).get("history") or []
    res = {
        "score": float(run["metrics"].get(metric, math.nan) or math.nan),
        "metric": metric,
        **stop_record(run.get("early_stopping"), hist),
        "scores": {
            k: v for k, v in run["metrics"].items() if k not in ("confusion_matrix", "per_scene")
        },  # fmt: skip
        "per_scene": run["metrics"].get("per_scene"),
        "loss_first": run["loss_first"],
        "loss_last": run["loss_last"],
        "steps": run["steps"],
        "budget": f"{entry.epochs} epochs" if budget is not None else "task default",
        "model": run["model"],
        "data_info": summary.get("data_info"),
        "label_fraction": float(entry.label_fraction),
    }
    if run.get("threshold"):  # chosen on the validation split; the scores above use it
        t = run["threshold"]
        res.update(threshold=t["threshold"], validation_scenes=t["val_scenes"],
                   val_pr_curve=t["val_pr_curve"])  # fmt: skip
    return res

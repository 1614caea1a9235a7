"""Linear-probe evaluation: does the representation separate the labelled classes?

Features of a frozen encoder (spatially pooled ``geo`` / ``fused`` and per-modality tokens,
concatenated) are standardised, then a multinomial logistic regression is fit on the train
split (full-batch L-BFGS, L2) and scored on the val split. The same probe on a randomly
initialised encoder is the baseline a pre-trained encoder must beat.

A small labelled set (fewer than ``cv_below`` samples in train + val, such as the embedded
sample's 40 + 8) makes one val split too coarse to compare two encoders (8 samples: steps of
12.5 %): there the score is the mean accuracy of repeated stratified k-fold cross-validation over
train + val instead, every sample predicted once per repeat by a probe that did not see it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)


def pooled_features(out: dict) -> torch.Tensor:
    """(B, F) float32: the mean over the grid of ``geo`` (else ``fused``), and the mean over
    valid steps and the grid of each modality's tokens, concatenated."""
    parts = []
    main = out.get("geo", out.get("fused"))
    if main is not None:
        parts.append(main.float().mean(dim=(-2, -1)))
    for mod in MODALITIES:
        tok = out.get(f"tokens_{mod}")
        if tok is None:
            continue
        valid = out[f"valid_{mod}"].to(tok.dtype)  # (B, T)
        pooled = tok.float().mean(dim=(-2, -1))  # (B, T, C)
        w = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
        parts.append((pooled * w[..., None]).sum(dim=1))
    if not parts:
        raise ValueError("linear probe: the encoder output has no features to pool")
    return torch.cat(parts, dim=1)


@torch.no_grad()
def extract(encoder: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every batch (labels: (B,) int64 from ``label``)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        feats.append(pooled_features(encoder(batch)).cpu())
        labels.append(batch["label"].cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_score(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """Val accuracy of an L2-regularised multinomial logistic regression fit on train."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    lin = nn.Linear(xt.shape[1], n_classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    xt, xv = xt.double(), xv.double()
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = (
            nn.functional.cross_entropy(lin(xt), y_train) + weight_decay * lin.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(xv).argmax(1) == y_val).double().mean().item()


def stratified_folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint index sets covering ``y``, each class spread evenly over them."""
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold_of[idx] = (torch.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class starts where this one stopped: balanced fold sizes
    return [torch.nonzero(fold_of == f).flatten() for f in range(k)]


def cross_val_score(x: torch.Tensor, y: torch.Tensor, k: int = 4, repeats: int = 3) -> float:
    """Mean accuracy over ``repeats`` stratified ``k``-fold cross-validations (fixed seeds, so
    two encoders are scored on the same folds)."""
    correct, total = 0.0, 0
    for r in range(repeats):
        for test in stratified_folds(y, k, seed=r):
            train = torch.ones(len(y), dtype=torch.bool)
            train[test] = False
            acc = fit_score(x[train], y[train], x[test], y[test])
            correct += acc * len(test)
            total += len(test)
    return correct / total


def linear_probe(
    encoder: nn.Module, train_batches, val_batches, device, cv_below: int = 256
) -> float:
    """Accuracy of a linear probe on ``encoder``'s frozen, pooled features: fit on the train
    batches and scored on the val batches, or, when train + val hold fewer than ``cv_below``
    samples, cross-validated over both (see the module docstring)."""
    xt, yt = extract(encoder, train_batches, device)
    xv, yv = extract(encoder, val_batches, device)
    if len(yt) + len(yv) < cv_below:
        return cross_val_score(torch.cat([xt, xv]), torch.cat([yt, yv]))
    return fit_score(xt, yt, xv, yv)

"""Statistics of repeated runs: mean, interquartile mean, bootstrap intervals, normalised scores.

Definitions (the ones GEO-Bench and rliable report):

- IQM (interquartile mean): the mean of the values left after sorting and cutting
  ``floor(0.25 n)`` values from each end (``scipy.stats.trim_mean(x, 0.25)``). With fewer than 4
  values nothing is cut and the IQM is the mean.
- Bootstrap 95 % interval: the 2.5 and 97.5 percentiles (linear interpolation between order
  statistics, numpy's default) of the statistic over ``n_boot`` resamples of the values drawn
  with replacement (percentile bootstrap), from a seeded generator.
- Normalised score of a model on an entry: ``(s - r) / (1 - r)``, where ``s`` is its score and
  ``r`` the mean score of the random-init encoder on the same entry with the same protocol,
  data and budget; 1 is the metric's ceiling (every headline metric here, OA, mIoU, F1 and mAP,
  lies in [0, 1]). So 0 is "no better than an untrained encoder", 1 is "perfect", and the value
  reads as the share of the gap between random init and perfect that the model closes; it does
  not depend on which other models are in the table. Across entries the normalised scores are
  summarised by their mean and IQM, with a stratified bootstrap interval (seeds resampled within
  every entry, the random-init reference kept at its mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean (see the module docstring); NaN for no values."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if n == 0:
        return math.nan
    g = int(math.floor(0.25 * n))
    return float(x[g : n - g].mean())


def mean(values: Sequence[float]) -> float:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()) if len(x) else math.nan


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (1-D); (NaN, NaN) for no
    values, (v, v) for one value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (math.nan, math.nan)
    if len(x) == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = (
        np.apply_along_axis(statistic, 1, x[idx]) if statistic is not np.mean else x[idx].mean(1)
    )
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return (float(lo), float(hi))


def summarise(values: Sequence[float], n_boot: int = 10000, seed: int = 0) -> dict:
    """``{"n", "values", "mean", "std", "iqm", "ci95": [lo, hi]}`` of one entry's per-seed scores
    (NaN scores are left out; ``std`` with ddof=1, 0 for one value)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return {
        "n": int(len(x)),
        "values": [float(v) for v in x],
        "mean": mean(x),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "iqm": iqm(x),
        "ci95": list(bootstrap_ci(x, np.mean, n_boot, seed=seed)),
    }


def normalise(score: float, reference: float, ceiling: float = 1.0) -> float:
    """``(score - reference) / (ceiling - reference)``; NaN when the reference is at the ceiling."""
    if ceiling - reference <= 0 or math.isnan(reference):
        return math.nan
    return (score - reference) / (ceiling - reference)


def aggregate_normalised(
    per_entry: Mapping[str, Sequence[float]],
    references: Mapping[str, float],
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """One model's normalised score across entries.

    Args:
        per_entry: entry id -> the model's per-seed scores on it.
        references: entry id -> the random-init mean score on it (entries without one are
            left out).
    Returns:
        ``{"entries": {id: normalised mean}, "mean", "iqm", "ci95"}``; the interval is the
        percentile bootstrap of the mean over entries, seeds resampled within each entry.
    """
    ids = [
        k
        for k, v in per_entry.items()
        if k in references and len(v) and not math.isnan(normalise(0.0, references[k]))
    ]
    if not ids:
        return {"entries": {}, "mean": math.nan, "iqm": math.nan, "ci95": [math.nan, math.nan]}
    norm = {k: normalise(mean(per_entry[k]), references[k]) for k in ids}
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for k in ids:
        x = np.asarray(per_entry[k], dtype=np.float64)
        m = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
        boots += (m - references[k]) / (1.0 - references[k])
    boots /= len(ids)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    vals = list(norm.values())
    return {"entries": norm, "mean": mean(vals), "iqm": iqm(vals), "ci95": [float(lo), float(hi)]}

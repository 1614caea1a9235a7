"""Change detection's decision threshold chosen on a validation city (fine-tuning protocols).

Argmax over two classes is a threshold of 0.5 on P(change), which over-predicts change where
change is rare (1-3 % of a city's pixels) and the loss is class-weighted. Here one of the
training cities (``train_cities[seed % n]``) is held out of fine-tuning; the fine-tuned model's
P(change) over its labelled pixels gives the precision/recall curve and the threshold of the
best F1, which then scores the evaluation cities (pooled and per city). Data configs without
``train_cities`` (OSCD's) keep the argmax.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from skysense.tasks.benchmark import probes
from skysense.tasks.downstream import metrics as M
from skysense.tasks.downstream.datasets.common import IGNORE_INDEX
from skysense.tasks.downstream.evaluation import predict_scene


def held_out_city(data_cfg, seed: int) -> tuple[list[str], str] | None:
    """(training cities without the held-out one, the held-out city), or None when the data
    config names fewer than two training cities."""
    cities = data_cfg.get("train_cities")
    if not cities or len(cities) < 2:
        return None
    cities = list(cities)
    val = cities[seed % len(cities)]
    return [c for c in cities if c != val], val


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


def _scores(p: torch.Tensor, y: torch.Tensor, t: float) -> dict:
    pred = (p >= t).long()
    out = {f"change_{k}": v for k, v in M.binary_scores(M.confusion_matrix(pred, y, 2)).items()}
    out["predicted_change_share"] = float(pred.float().mean()) if len(pred) else float("nan")
    out["true_change_share"] = float(y.float().mean()) if len(y) else float("nan")
    return out


def tuned_change_scores(model, source, data_cfg, val_city: str, ev, device) -> dict:
    """Threshold from ``val_city``, scores of the evaluation cities of ``data_cfg`` with it.
    ``model``: a change model (``model(batch)["logits"]``) on ``device``; ``source``: its
    feature source (what the data is read for)."""
    from skysense.tasks.downstream.data import build_task_data

    val_cfg = OmegaConf.merge(data_cfg, {"val_split": "train", "val_cities": [val_city]})
    val = change_probs(model, build_task_data(val_cfg, 0, 0, source).eval, ev, device)
    pv = torch.cat([v[1] for v in val])
    yv = torch.cat([v[2] for v in val])
    t = probes.best_threshold(pv, yv)
    test = change_probs(model, build_task_data(data_cfg, 0, 0, source).eval, ev, device)
    pt = torch.cat([v[1] for v in test])
    yt = torch.cat([v[2] for v in test])
    return {
        "threshold": t,
        "validation_city": val_city,
        "val_pr_curve": probes.pr_curve(pv, yv),
        "scores": {**_scores(pt, yt, t), "threshold": t},
        "per_scene": {name: _scores(p, y, t) for name, p, y in test},
    }

"""`skysense finetune` and `skysense evaluate`, as functions of the composed config.

A fine-tuning run builds the task's data, then for each initialisation (the pre-training
checkpoint, and with ``compare_random_init`` also a random encoder, or only the random one when
``checkpoint`` is null) builds encoder + head, trains, evaluates on the held-out data and writes
under ``run_dir/<init>/``: ``model.pt`` (the fine-tuned model file), ``metrics.json``, and the
plots (loss curve, confusion matrix, prediction overlays). ``run_dir/summary.json`` and
``summary.md`` put the runs side by side in one table; ``run_dir/loss.png`` shows their loss
curves together. Every initialisation sees the same data in the same order and the same head
initialisation (same seed), so the table compares the encoders only.

Validation (``trainer.val_fraction`` > 0): a share of the *training* data is held out
(:mod:`holdout`: whole scenes for dense data, images stratified by class otherwise) and
``trainer.label_fraction`` of the rest is trained on. With ``trainer.eval_every`` > 0 the model is
scored on that split every so many steps; ``trainer.patience`` evaluations without improvement
stop the run, and the best evaluation's weights are kept (:class:`trainer.EarlyStopping`).
Change detection picks its decision threshold on the validation scenes (best change F1; the
precision/recall curve in ``<init>/pr_curve.{json,png}``); the threshold is saved in the model
file's metadata, so ``evaluate`` and ``infer`` use it. ``optim.schedule``: ``cosine`` (warm-up
then cosine to ``min_lr``) or ``multistep`` (PANGAEA: the lr times ``gamma`` at each of
``milestones``, shares of ``trainer.max_steps``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from skysense.tasks.downstream import plots
from skysense.tasks.downstream.checkpoint import load_finetuned, save_finetuned
from skysense.tasks.downstream.data import TaskData, build_task_data
from skysense.tasks.downstream.datasets.common import collate
from skysense.tasks.downstream.evaluation import (
    evaluate_classification,
    evaluate_dense,
    evaluate_detection,
)
from skysense.tasks.downstream.fit import Plan, fit_one, plan_finetune
from skysense.tasks.downstream.validation import choose_threshold
from skysense.tasks.errors import ConfigError
from skysense.tasks.training.runtime import resolve_device, seed_everything, set_threads

log = logging.getLogger(__name__)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1))
    tmp.replace(path)
    return path


def evaluate_model(
    model,
    kind: str,
    data: TaskData,
    cfg,
    device,
    out_dir: Path,
    title: str,
    threshold: float | None = None,
) -> dict:
    """Scores on the held-out data, written with the plots into ``out_dir`` (``threshold``:
    change models' decision threshold on P(change); None: argmax)."""
    ev = cfg.task.eval
    n = len(data.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    if kind in ("segmentation", "change"):
        scores, cm, preds = evaluate_dense(
            model, kind, data.eval, n, ev.window, ev.overlap, ev.batch_size, device, threshold
        )
        files["confusion"] = plots.plot_confusion(
            cm, data.classes, out_dir / "confusion.png", f"{title}: confusion (pixels)"
        )
        files["predictions"] = plots.plot_dense_predictions(
            data.eval, preds, out_dir / "predictions.png", kind, data.classes, title=title
        )
        scores["confusion_matrix"] = cm.tolist()
    elif kind == "detection":
        scores, preds = evaluate_detection(model, data.eval, device)
        files["predictions"] = plots.plot_detections(
            data.eval, preds, out_dir / "predictions.png", data.classes, title=title
        )
    else:
        if data.eval_batches is not None:
            loader = data.eval_batches(cfg.trainer.eval_batch_size)
        else:
            loader = DataLoader(
                data.eval, batch_size=cfg.trainer.eval_batch_size, collate_fn=collate
            )
        scores, extra = evaluate_classification(model, kind, loader, n, device)
        if kind == "classification":
            files["confusion"] = plots.plot_confusion(
                extra["cm"], data.classes, out_dir / "confusion.png", f"{title}: confusion"
            )
            scores["confusion_matrix"] = extra["cm"].tolist()
        else:
            files["predictions"] = plots.plot_multilabel(
                scores["per_class_AP"],
                data.classes,
                extra["scores"],
                extra["targets"],
                out_dir / "predictions.png",
                title,
            )
    scores["plots"] = {k: str(v) for k, v in files.items()}
    return scores


HEADLINE = {
    "change": ("change_F1", "change_IoU"),
    "segmentation": ("mIoU", "mF1"),
    "classification": ("OA", "mF1"),
    "multilabel": ("mAP", "mAP_micro"),
    "detection": ("mAP50", "mAP50_voc"),
}


def _runs(cfg) -> list[tuple[str, str | None]]:
    if cfg.checkpoint:
        runs = [("pretrained", str(cfg.checkpoint))]
        if cfg.compare_random_init:
            runs.append(("random", None))
        return runs
    return [("random", None)]


def finetune(cfg: DictConfig) -> dict:
    """Fine-tune, evaluate and report (see the module docstring). Returns the summary."""
    plan = plan_finetune(cfg)
    run_dir = Path(str(cfg.run_dir))
    summary = {"task": cfg.task.name, "kind": plan.kind, "data": cfg.data.name,
               "features": plan.source, "classes": plan.data.classes,
               "data_info": plan.data.info, "runs": {}}  # fmt: skip
    histories = {}
    for name, ckpt in _runs(cfg):
        result = _run_one(cfg, plan, name, ckpt, run_dir / name)
        histories[name] = result.pop("history")
        write_json(run_dir / name / "metrics.json",
                   {**summary, **result, "history": histories[name], "runs": None})  # fmt: skip
        plots.plot_losses({name: histories[name]}, run_dir / name / "loss.png",
                          f"{cfg.task.name} [{name}]: training loss")  # fmt: skip
        summary["runs"][name] = result
    summary["loss_plot"] = str(
        plots.plot_losses(histories, run_dir / "loss.png", f"{cfg.task.name}: training loss")
    )
    summary["table"] = table = summary_table(summary)
    write_json(run_dir / "summary.json", summary)
    (run_dir / "summary.md").write_text(table + "\n")
    print(table)
    return summary


def _run_one(cfg, plan: Plan, name: str, ckpt: str | None, out_dir: Path) -> dict:
    """Train one initialisation (``ckpt``; None: random), choose change detection's threshold
    on the validation split, save the model file and evaluate it: the run's result record."""
    log.info("=== %s: %s on %s from %s", name, cfg.task.name, cfg.data.name,
             ckpt or "random initialisation")  # fmt: skip
    fit = fit_one(cfg, plan, name, ckpt)
    model, kind = fit.model, plan.kind
    thr = None
    if kind == "change" and plan.val is not None and cfg.task.get("threshold", "val") == "val":
        thr = choose_threshold(model, plan.val, cfg.task.eval, plan.device, out_dir)
    meta = {
        "preset": fit.info["preset"], "overrides": fit.info["overrides"], "kind": kind,
        "source": plan.source, "n_classes": len(plan.data.classes),
        "channels": _channels(model, kind), "head": plan.head, "classes": plan.data.classes,
        "inputs": plan.data.inputs, "task": cfg.task.name, "data": cfg.data.name,
        "init": {"checkpoint": ckpt, "key": fit.info.get("key")},
        "eval": OmegaConf.to_container(cfg.task.eval, resolve=True),
        "threshold": thr["threshold"] if thr else None,
        "temporal": cfg.task.get("temporal") or "mean",
    }  # fmt: skip
    save_finetuned(out_dir / "model.pt", model, meta)
    t1 = time.perf_counter()
    scores = evaluate_model(model, kind, plan.data, cfg, plan.device, out_dir,
                            f"{cfg.task.name} [{name}]", meta["threshold"])  # fmt: skip
    losses = [h["loss"] for h in fit.history]
    k = max(1, len(losses) // 5)
    tr = cfg.trainer
    return {
        "init": name, "checkpoint": ckpt, "encoder_key": fit.info.get("key"),
        "load_report": fit.info.get("report"), "steps": len(fit.history),
        "budget_steps": tr.max_steps,
        "early_stopping": (fit.stopper.record(len(fit.history), tr.max_steps)
                           if fit.stopper else None),
        "threshold": thr, "batch_size": tr.batch_size,
        "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
        "train_seconds": fit.seconds, "eval_seconds": time.perf_counter() - t1,
        "metrics": scores, "history": fit.history, "model": str(out_dir / "model.pt"),
    }  # fmt: skip


def _channels(model, kind: str) -> list[int]:
    if kind == "detection":
        return list(model.detector.backbone.fpn_in_channels)
    return list(model.channels)


def summary_table(summary: dict) -> str:
    keys = HEADLINE[summary["kind"]]
    lines = [
        f"{summary['task']} on {summary['data']} ({summary['features']} features)",
        "",
        "| init | " + " | ".join(keys) + " | loss first -> last | steps | train s |",
        "|---|" + "---|" * len(keys) + "---|---|---|",
    ]
    for name, r in summary["runs"].items():
        vals = [r["metrics"].get(k) for k in keys]
        cells = [
            "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            for v in vals
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {r['loss_first']:.4f} -> {r['loss_last']:.4f} | {steps_cell(r)} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "loss first -> last: the mean training loss over the first and over the last fifth of "
        "the steps run.",
    ]
    if any(r.get("early_stopping") for r in summary["runs"].values()):
        lines.append(
            "steps: steps run of the budget; best = the step of the best validation score, "
            "whose weights were kept; early = stopped by patience before the budget."
        )
    thr = {n: r["threshold"] for n, r in summary["runs"].items() if r.get("threshold")}
    if thr:
        lines.append(
            "Change threshold chosen on the validation split ("
            + ", ".join(
                f"{n}: {t['threshold']:.2f}, val F1 {t['val_F1']:.3f}" for n, t in thr.items()
            )  # fmt: skip
            + f"; scenes {next(iter(thr.values()))['val_scenes']}); the scores above use it."
        )
    return "\n".join(lines)


def steps_cell(r: dict) -> str:
    """``steps`` or, with early stopping, ``run/budget (best B[, early])``."""
    es = r.get("early_stopping")
    if not es:
        return str(r["steps"])
    tail = ", early" if es["stopped_early"] else ""
    return f"{es['steps_run']}/{es['budget']} (best {es['best_step']}{tail})"


def evaluate(cfg: DictConfig) -> dict:
    """`skysense evaluate`: the fine-tuned model file ``weights`` (default: the first run's
    model under ``run_dir``) on the held-out data of ``data``."""
    run_dir = Path(str(cfg.run_dir))
    weights = (
        Path(str(cfg.weights)) if cfg.get("weights") else run_dir / _runs(cfg)[0][0] / "model.pt"
    )
    if not weights.is_file():
        raise ConfigError(
            "weights", f"{weights} does not exist (fine-tune first, or set weights=...)"
        )
    model, meta = load_finetuned(weights)
    device = resolve_device(cfg.trainer.device, "trainer.device")
    set_threads(cfg.trainer.get("threads"))
    model.to(device)
    seed_everything(cfg.seed)
    data = build_task_data(cfg.data, 0, cfg.seed, meta["source"])
    if meta["kind"] not in data.kinds:
        raise ConfigError(
            "data",
            f"{weights} is a {meta['kind']} model; data={cfg.data.name} serves {list(data.kinds)}",
        )
    if list(meta["classes"]) != list(data.classes):
        raise ConfigError(
            "data",
            f"{weights} was trained on classes {meta['classes']}, data={cfg.data.name} has {data.classes}",
        )
    out_dir = run_dir / "evaluate"
    cfg_eval = OmegaConf.merge(
        cfg, {"task": {"eval": meta.get("eval") or OmegaConf.to_container(cfg.task.eval)}}
    )
    scores = evaluate_model(
        model,
        meta["kind"],
        data,
        cfg_eval,
        device,
        out_dir,
        f"evaluate {weights.name}",
        meta.get("threshold"),
    )
    res = {
        "weights": str(weights),
        "task": meta["task"],
        "kind": meta["kind"],
        "data": cfg.data.name,
        "metrics": scores,
    }
    write_json(out_dir / "metrics.json", res)
    keys = HEADLINE[meta["kind"]]
    print(" ".join(f"{k}={scores.get(k)}" for k in keys) + f"  ({out_dir / 'metrics.json'})")
    return res

"""`skysense finetune` and `skysense evaluate`, as functions of the composed config.

A fine-tuning run builds the task's data, then for each initialisation (the pre-training
checkpoint, and with ``compare_random_init`` also a random encoder, or only the random one when
``checkpoint`` is null) builds encoder + head, trains, evaluates on the held-out data and writes
under ``run_dir/<init>/``: ``model.pt`` (the fine-tuned model file), ``metrics.json``, and the
plots (loss curve, confusion matrix, prediction overlays). ``run_dir/summary.json`` and
``summary.md`` put the runs side by side in one table; ``run_dir/loss.png`` shows their loss
curves together. Every initialisation sees the same data in the same order and the same head
initialisation (same seed), so the table compares the encoders only.

Validation (``train.val_fraction`` > 0): a share of the *training* data is held out
(:mod:`holdout`: whole scenes for dense data, images stratified by class otherwise) and
``train.label_fraction`` of the rest is trained on. With ``train.eval_every`` > 0 the model is
scored on that split every so many steps; ``train.patience`` evaluations without improvement
stop the run, and the best evaluation's weights are kept (:class:`trainer.EarlyStopping`).
Change detection picks its decision threshold on the validation scenes (best change F1; the
precision/recall curve in ``<init>/pr_curve.{json,png}``); the threshold is saved in the model
file's metadata, so ``evaluate`` and ``infer`` use it. ``optim.schedule``: ``cosine`` (warm-up
then cosine to ``min_lr``) or ``multistep`` (PANGAEA: the lr times ``gamma`` at each of
``milestones``, shares of ``train.max_steps``).
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
from skysense.tasks.downstream.checkpoint import build_encoder, load_finetuned, save_finetuned
from skysense.tasks.downstream.data import TaskData, build_task_data
from skysense.tasks.downstream.datasets.common import collate
from skysense.tasks.downstream.evaluation import (
    evaluate_classification,
    evaluate_dense,
    evaluate_detection,
)
from skysense.tasks.downstream.holdout import carve, val_fraction_of
from skysense.tasks.downstream.losses import TaskLoss
from skysense.tasks.downstream.model import KINDS
from skysense.tasks.downstream.temporal import build_temporal_model
from skysense.tasks.downstream.trainer import EarlyStopping, train
from skysense.tasks.downstream.validation import choose_threshold, score_fn
from skysense.tasks.errors import ConfigError
from skysense.tasks.training.optim import build_optimizer, scaled_lr
from skysense.tasks.training.runtime import resolve_device, seed_everything, set_threads

log = logging.getLogger(__name__)

# Head options each model class takes (config task.head -> constructor keywords).
_DENSE_HEAD = {
    "channels": "head_channels",
    "aux_weight": "aux_weight",
    "dropout": "dropout",
    "norm": "norm",
}
_DET_HEAD = {
    "fpn_channels": "fpn_channels",
    "anchor_sizes": "anchor_sizes",
    "representation": "representation",
    "size_divisible": "size_divisible",
    # auto: the rotated-box branch when the training data carry oriented boxes (DIOR-R, FAIR1M).
    "oriented": "oriented",
}


def resolve_source(task, data: TaskData) -> str:
    src = task.features
    mods = data.inputs["modalities"]
    if src == "auto":
        return mods[0] if len(mods) == 1 else "fused"
    if src in ("hr", "s2", "s1") and src not in mods:
        raise ConfigError("task.features", f"{src!r} but the data holds only {mods}")
    return src


def head_options(task, kind: str) -> dict:
    head = OmegaConf.to_container(task.head, resolve=True) if task.get("head") else {}
    table = _DET_HEAD if kind == "detection" else _DENSE_HEAD
    unknown = sorted(set(head) - set(table) - set(_DENSE_HEAD) - set(_DET_HEAD))
    if unknown:
        raise ConfigError(
            "task.head",
            f"unknown option(s) {unknown}; known: {sorted(set(_DENSE_HEAD) | set(_DET_HEAD))}",
        )
    out = {
        table[k]: (tuple(v) if isinstance(v, list) else v) for k, v in head.items() if k in table
    }
    out["freeze_encoder"] = bool(task.get("freeze_encoder", False))
    return out


def lr_schedule(o, max_steps: int, lr: float):
    """The base lr of each step for ``optim.schedule`` (None: the trainer's warm-up + cosine)."""
    name = o.get("schedule") or "cosine"
    if name == "cosine":
        return None
    if name == "multistep":
        from skysense.tasks.training.schedules import multistep

        ms = tuple(float(m) for m in (o.get("milestones") or (0.6, 0.9)))
        if any(not 0.0 < m <= 1.0 for m in ms):
            raise ConfigError("optim.milestones", f"shares of the steps in (0, 1], not {ms}")
        gamma, warm = float(o.get("gamma", 0.1)), int(o.get("warmup_steps") or 0)
        return lambda step: multistep(step, max_steps, lr, ms, gamma, warm)
    raise ConfigError("optim.schedule", f"cosine or multistep, not {name!r}")


def _check_task(cfg) -> None:
    task = cfg.task
    if task.get("kind") not in KINDS:
        raise ConfigError("task.kind", f"must be one of {KINDS}, got {task.get('kind')!r}")


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
            loader = data.eval_batches(cfg.train.eval_batch_size)
        else:
            loader = DataLoader(data.eval, batch_size=cfg.train.eval_batch_size, collate_fn=collate)
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
    _check_task(cfg)
    kind = cfg.task.kind
    tr = cfg.train
    device = resolve_device(tr.device, "train.device")
    set_threads(tr.get("threads"))
    run_dir = Path(str(cfg.run_dir))
    seed_everything(cfg.seed)
    data = build_task_data(
        cfg.data, tr.max_steps * tr.batch_size, cfg.seed, cfg.task.get("features")
    )
    if kind not in data.kinds:
        raise ConfigError(
            "task",
            f"task {cfg.task.name} ({kind}) does not fit data={cfg.data.name}, whose labels serve {list(data.kinds)}",
        )
    vf, lf = val_fraction_of(cfg), float(tr.get("label_fraction") or 1.0)
    val = None
    if vf > 0 or lf < 1:
        data, val = carve(data, cfg.data, tr.max_steps * tr.batch_size, cfg.seed,
                          cfg.task.get("features"), vf, lf)  # fmt: skip
    every = int(tr.get("eval_every") or 0)
    if every > 0 and vf == 0:
        raise ConfigError("train.eval_every", "needs a validation split: set train.val_fraction")
    if every > 0 and val is None:  # a single training scene / image: nothing to hold out
        log.warning("train.eval_every: no validation split could be held out; no early stop")
        every = 0
    vmetric = tr.get("val_metric") or "score"
    source = resolve_source(cfg.task, data)
    head = head_options(cfg.task, kind)
    if data.train_batches is not None:
        example = next(iter(data.train_batches(1)))
    else:
        example = collate([data.train[0]])
    if kind == "detection" and head.get("oriented", "auto") == "auto":
        head["oriented"] = "polygons" in example
    weights = None
    if kind in ("segmentation", "change"):
        cw = cfg.task.get("class_weights")
        if cw == "auto":
            weights = data.class_weights
        elif cw is not None:
            weights = list(cw)
    summary = {
        "task": cfg.task.name,
        "kind": kind,
        "data": cfg.data.name,
        "features": source,
        "classes": data.classes,
        "data_info": data.info,
        "runs": {},
    }
    histories = {}
    for name, ckpt in _runs(cfg):
        log.info(
            "=== %s: %s on %s from %s",
            name,
            cfg.task.name,
            cfg.data.name,
            ckpt or "random initialisation",
        )
        seed_everything(cfg.seed)
        encoder, info = build_encoder(
            cfg.model.preset,
            OmegaConf.to_container(cfg.model.overrides, resolve=True),
            ckpt,
            cfg.encoder_key,
            cfg.strict,
            bool(cfg.model.get("checkpointing", False)),
        )
        torch.manual_seed(cfg.seed + 1)  # the same head initialisation for every encoder
        model = build_temporal_model(encoder, kind, source, len(data.classes), example,
                                     cfg.task.get("temporal"), **dict(head))  # fmt: skip
        model.to(device)
        o = cfg.optim
        lr = scaled_lr(o, tr.batch_size)
        layer_decay = 1.0 if head["freeze_encoder"] else o.layer_decay
        # Fine-tuning keeps the weight decay constant (weight_decay_end is pre-training's).
        optimizer = build_optimizer(model, o, lr, layer_decay)
        if data.train_batches is not None:
            loader = data.train_batches(tr.batch_size)
        else:
            # Samples are drawn per index from seeded generators: no shuffle needed.
            loader = DataLoader(
                data.train,
                batch_size=tr.batch_size,
                shuffle=False,
                collate_fn=collate,
                num_workers=tr.num_workers,
                drop_last=True,
            )
        loss_fn = TaskLoss(kind, weights, head.get("aux_weight", 0.0)).to(device)
        stopper = None
        if every > 0:
            stopper = EarlyStopping(score_fn(kind, val, cfg, device, vmetric), every,
                                    tr.get("patience"), float(tr.get("min_delta") or 0.0))  # fmt: skip
        t0 = time.perf_counter()
        history = train(
            model,
            loss_fn,
            kind,
            loader,
            optimizer,
            tr.max_steps,
            lr,
            o.min_lr,
            o.warmup_steps,
            o.grad_clip,
            tr.log_every,
            device,
            desc=f"finetune[{name}]",
            lr_fn=lr_schedule(o, tr.max_steps, lr),
            stopper=stopper,
        )
        train_s = time.perf_counter() - t0
        histories[name] = history
        out_dir = run_dir / name
        thr = None
        if kind == "change" and val is not None and cfg.task.get("threshold", "val") == "val":
            thr = choose_threshold(model, val, cfg.task.eval, device, out_dir)
        meta = {
            "preset": info["preset"],
            "overrides": info["overrides"],
            "kind": kind,
            "source": source,
            "n_classes": len(data.classes),
            "channels": _channels(model, kind),
            "head": head,
            "classes": data.classes,
            "inputs": data.inputs,
            "task": cfg.task.name,
            "data": cfg.data.name,
            "init": {"checkpoint": ckpt, "key": info.get("key")},
            "eval": OmegaConf.to_container(cfg.task.eval, resolve=True),
            "threshold": thr["threshold"] if thr else None,
            "temporal": cfg.task.get("temporal") or "mean",
        }
        save_finetuned(out_dir / "model.pt", model, meta)
        t1 = time.perf_counter()
        scores = evaluate_model(
            model,
            kind,
            data,
            cfg,
            device,
            out_dir,
            f"{cfg.task.name} [{name}]",
            meta["threshold"],
        )
        eval_s = time.perf_counter() - t1
        losses = [h["loss"] for h in history]
        k = max(1, len(losses) // 5)
        result = {
            "init": name,
            "checkpoint": ckpt,
            "encoder_key": info.get("key"),
            "load_report": info.get("report"),
            "steps": len(history),
            "budget_steps": tr.max_steps,
            "early_stopping": stopper.record(len(history), tr.max_steps) if stopper else None,
            "threshold": thr,
            "batch_size": tr.batch_size,
            "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])),
            "train_seconds": train_s,
            "eval_seconds": eval_s,
            "metrics": scores,
            "history": history,
            "model": str(out_dir / "model.pt"),
        }
        write_json(out_dir / "metrics.json", {**summary, **result, "runs": None})
        plots.plot_losses(
            {name: history}, out_dir / "loss.png", f"{cfg.task.name} [{name}]: training loss"
        )
        summary["runs"][name] = {k: v for k, v in result.items() if k != "history"}
    summary["loss_plot"] = str(
        plots.plot_losses(histories, run_dir / "loss.png", f"{cfg.task.name}: training loss")
    )
    table = summary_table(summary)
    summary["table"] = table
    write_json(run_dir / "summary.json", summary)
    (run_dir / "summary.md").write_text(table + "\n")
    print(table)
    return summary


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
    device = resolve_device(cfg.train.device, "train.device")
    set_threads(cfg.train.get("threads"))
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

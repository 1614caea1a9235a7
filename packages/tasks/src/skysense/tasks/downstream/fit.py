"""What one fine-tuning run is made of, for :func:`skysense.tasks.downstream.run.finetune`.

- :func:`plan_finetune`: what every initialisation of a run shares: the task data (with the
  validation split and label fraction carved out of the training data, :mod:`holdout`), the
  feature source, the head options, an example batch that sizes the head, the class weights,
  the device.
- :func:`fit_one`: one initialisation (a pre-training checkpoint or random) built into encoder +
  head, its optimizer (one parameter-group rule: :mod:`skysense.tasks.training.optim`), loader,
  loss and early stopping, trained; the seeds are set so that every initialisation sees the same
  data in the same order and the same head initialisation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from skysense.kernels.modalities import MODALITIES
from skysense.tasks.downstream.checkpoint import build_encoder
from skysense.tasks.downstream.data import TaskData, build_task_data
from skysense.tasks.downstream.datasets.common import collate
from skysense.tasks.downstream.holdout import carve, val_fraction_of
from skysense.tasks.downstream.losses import TaskLoss
from skysense.tasks.downstream.model import KINDS
from skysense.tasks.downstream.temporal import build_temporal_model
from skysense.tasks.downstream.trainer import EarlyStopping, train
from skysense.tasks.downstream.validation import score_fn
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


def resolve_source(task, data: TaskData, example: dict | None = None) -> str:
    """The encoder features ``task.features`` names for ``data``: ``auto`` is the one modality
    or the fused features; ``geo`` (F_out: fused + geo-context read-out, the multi-modal tasks'
    default) falls back to ``fused`` when the ``example`` batch has no finite ``latlon`` (the
    read-out would be zeros: the geo-context prototypes need the location)."""
    src = task.features
    mods = data.inputs["modalities"]
    if src == "auto":
        return mods[0] if len(mods) == 1 else "fused"
    if src in MODALITIES and src not in mods:
        raise ConfigError("task.features", f"{src!r} but the data holds only {mods}")
    if src == "geo" and example is not None:
        ll = example.get("latlon")
        if ll is None or not torch.isfinite(torch.as_tensor(ll, dtype=torch.float64)).all():
            log.info("task.features=geo: the data give no location (latlon); fused features")
            return "fused"
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
    name = o.schedule
    if name == "cosine":
        return None
    if name == "multistep":
        from skysense.tasks.training.schedules import multistep

        ms = tuple(float(m) for m in o.milestones)
        if any(not 0.0 < m <= 1.0 for m in ms):
            raise ConfigError("optim.milestones", f"shares of the steps in (0, 1], not {ms}")
        gamma, warm = float(o.gamma), int(o.warmup_steps or 0)
        return lambda step: multistep(step, max_steps, lr, ms, gamma, warm)
    raise ConfigError("optim.schedule", f"cosine or multistep, not {name!r}")


def _check_task(cfg) -> None:
    task = cfg.task
    if task.get("kind") not in KINDS:
        raise ConfigError("task.kind", f"must be one of {KINDS}, got {task.get('kind')!r}")


@dataclass
class Plan:
    """What every initialisation of one fine-tuning run shares."""

    kind: str
    data: TaskData  # training data (carved) and the held-out evaluation data
    val: TaskData | None  # the validation split carved from the training data
    eval_every: int  # early-stopping evaluations every so many steps (0: none)
    source: str  # the encoder features the head reads
    head: dict  # head constructor keywords
    example: dict  # a collated training batch of one item (sizes the head)
    class_weights: list | None
    device: torch.device


def plan_finetune(cfg) -> Plan:
    """Validate the task, set device / threads / seed, build and carve the data."""
    _check_task(cfg)
    kind, tr = cfg.task.kind, cfg.trainer
    device = resolve_device(tr.device, "trainer.device")
    set_threads(tr.get("threads"))
    seed_everything(cfg.seed)
    length = tr.max_steps * tr.batch_size
    data = build_task_data(cfg.data, length, cfg.seed, cfg.task.get("features"))
    if kind not in data.kinds:
        raise ConfigError("task", f"task {cfg.task.name} ({kind}) does not fit "
                          f"data={cfg.data.name}, whose labels serve {list(data.kinds)}")  # fmt: skip
    vf, lf = val_fraction_of(cfg), float(tr.get("label_fraction") or 1.0)
    val = None
    if vf > 0 or lf < 1:
        data, val = carve(data, cfg.data, length, cfg.seed, cfg.task.get("features"), vf, lf)
    every = int(tr.get("eval_every") or 0)
    if every > 0 and vf == 0:
        raise ConfigError(
            "trainer.eval_every", "needs a validation split: set trainer.val_fraction"
        )
    if every > 0 and val is None:  # a single training scene / image: nothing to hold out
        log.warning("trainer.eval_every: no validation split could be held out; no early stop")
        every = 0
    head = head_options(cfg.task, kind)
    if data.train_batches is not None:
        example = next(iter(data.train_batches(1)))
    else:
        example = collate([data.train[0]])
    if kind == "detection" and head.get("oriented", "auto") == "auto":
        head["oriented"] = "polygons" in example
    weights = None
    cw = cfg.task.get("class_weights")
    if kind in ("segmentation", "change") and cw is not None:
        weights = data.class_weights if cw == "auto" else list(cw)
    return Plan(kind, data, val, every, resolve_source(cfg.task, data, example), head, example,
                weights, device)  # fmt: skip


@dataclass
class Fitted:
    model: nn.Module
    info: dict  # the encoder's load record (preset, overrides, key, report)
    history: list[dict]
    stopper: EarlyStopping | None
    seconds: float


def fit_one(cfg, plan: Plan, name: str, ckpt: str | None) -> Fitted:
    """Build encoder (from ``ckpt``; None: random) + head and train it."""
    tr, o = cfg.trainer, cfg.optim
    seed_everything(cfg.seed)
    encoder, info = build_encoder(
        cfg.model.preset, OmegaConf.to_container(cfg.model.overrides, resolve=True), ckpt,
        cfg.encoder_key, cfg.strict, bool(cfg.model.get("checkpointing", False)),
    )  # fmt: skip
    torch.manual_seed(cfg.seed + 1)  # the same head initialisation for every encoder
    model = build_temporal_model(encoder, plan.kind, plan.source, len(plan.data.classes),
                                 plan.example, cfg.task.get("temporal"), **dict(plan.head))  # fmt: skip
    model.to(plan.device)
    lr = scaled_lr(o, tr.batch_size)
    layer_decay = 1.0 if plan.head["freeze_encoder"] else o.layer_decay
    # Fine-tuning keeps the weight decay constant (weight_decay_end is pre-training's).
    optimizer = build_optimizer(model, o, lr, layer_decay)
    if plan.data.train_batches is not None:
        loader = plan.data.train_batches(tr.batch_size)
    else:  # samples are drawn per index from seeded generators: no shuffle needed
        loader = DataLoader(plan.data.train, batch_size=tr.batch_size, shuffle=False,
                            collate_fn=collate, num_workers=tr.num_workers, drop_last=True)  # fmt: skip
    loss_fn = TaskLoss(plan.kind, plan.class_weights, plan.head.get("aux_weight", 0.0))
    stopper = None
    if plan.eval_every > 0:
        score = score_fn(plan.kind, plan.val, cfg, plan.device, tr.get("val_metric") or "score")
        stopper = EarlyStopping(score, plan.eval_every, tr.get("patience"),
                                float(tr.get("min_delta") or 0.0))  # fmt: skip
    t0 = time.perf_counter()
    history = train(model, loss_fn.to(plan.device), plan.kind, loader, optimizer, tr.max_steps,
                    lr, o.min_lr, o.warmup_steps, o.grad_clip, tr.log_every, plan.device,
                    desc=f"finetune[{name}]", lr_fn=lr_schedule(o, tr.max_steps, lr),
                    stopper=stopper)  # fmt: skip
    return Fitted(model, info, history, stopper, time.perf_counter() - t0)

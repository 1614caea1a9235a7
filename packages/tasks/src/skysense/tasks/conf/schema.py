"""Typed schemas of the command-line configs (Hydra structured configs).

The YAML files under ``conf/`` hold the defaults people read and override; the dataclasses here
give every field of the optimiser, the trainers and the top-level settings its type, so that a
value of the wrong type (``optim.lr=abc``, ``trainer.max_steps=1.5``) or an unknown key is one
line naming the field when the config is composed, before any file or folder is created.
Groups whose fields differ by option (model, data, loss, task) stay untyped here; their own
validation names the field.

:func:`register` puts the schemas in Hydra's ConfigStore; the primary YAML files list them
first in their defaults (``- pretrain_schema``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class OptimConfig:
    """AdamW with warm-up and cosine schedules (``conf/optim/adamw.yaml`` documents each)."""

    name: str = "adamw"
    lr: float = 5.0e-4
    min_lr: float = 1.0e-6
    lr_scaling: str = "none"
    ref_batch: int = 256
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    layer_decay: float = 1.0
    grad_clip: float | None = 5.0
    # fine-tuning's lr schedule: cosine (warm-up then cosine to min_lr) or multistep (PANGAEA:
    # x gamma at each milestone, shares of the steps); pre-training always uses cosine
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.9])
    gamma: float = 0.1


@dataclass
class PretrainTrainerConfig:
    """``trainer.*`` of pre-training (``conf/trainer/default.yaml`` documents each)."""

    max_steps: int = 150
    batch_size: int = 8
    grad_accum: int = 1
    device: str = "auto"
    precision: str = "auto"
    nproc: int = 1
    threads: int | None = None
    strategy: str = "ddp"
    compile: bool = False
    teacher_momentum: float = 0.99
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    linear_probe: bool = True
    health_every: int = 50


@dataclass
class PretrainConfig:
    """``skysense pretrain``: top-level settings (``conf/pretrain.yaml`` documents each)."""

    seed: int = 0
    run_dir: str = "runs/pretrain"
    resume: bool = False
    overwrite: bool = False
    model: Any = MISSING
    data: Any = MISSING
    loss: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: PretrainTrainerConfig = field(default_factory=PretrainTrainerConfig)


@dataclass
class FinetuneTrainConfig:
    """``train.*`` of fine-tuning (``conf/finetune.yaml`` documents each)."""

    max_steps: int = 60
    batch_size: int = 8
    eval_batch_size: int = 8
    log_every: int = 10
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None
    # validation split carved from the training data (0: none), label share trained on,
    # early stopping: evaluate every N steps (0: off), stop after `patience` evaluations
    # without an improvement above min_delta (null: run the budget, keep the best weights)
    val_fraction: float = 0.0
    label_fraction: float = 1.0
    eval_every: int = 0
    patience: int | None = None
    min_delta: float = 0.0
    # what early stopping compares: score (the task's headline metric) or loss (image tasks)
    val_metric: str = "score"


@dataclass
class FinetuneConfig:
    """``skysense finetune`` / ``evaluate``: top-level settings (``conf/finetune.yaml``)."""

    seed: int = 0
    run_dir: str = MISSING
    checkpoint: str | None = None
    encoder_key: str = "teacher"
    strict: bool = True
    compare_random_init: bool = False
    weights: str | None = None
    model: Any = MISSING
    data: Any = MISSING
    task: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)


@dataclass
class InferConfig:
    """``skysense infer`` (``conf/infer.yaml`` documents each)."""

    src: str = MISSING
    dst: str = MISSING
    checkpoint: str = MISSING
    src2: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    window: int | None = None
    overlap: int | None = None
    batch_size: int = 8
    block: int = 1024
    output: str = "classes"
    overwrite: bool = False
    check_sensor: bool = True
    device: str = "auto"
    threads: int | None = None
    progress: bool = True


SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "infer": InferConfig}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)

"""Typed schemas of the command-line configs (Hydra structured configs).

The YAML files under ``conf/`` hold the defaults people read and override; the dataclasses here
give every field of the optimiser, the trainers and the top-level settings its type, so that a
value of the wrong type (``optim.lr=abc``, ``trainer.max_steps=1.5``) or an unknown key is one
line naming the field when the config is composed, before any file or folder is created.
Groups whose fields differ by option (data, loss, task) stay untyped here; their own
validation names the field.

The ``model`` group has no YAML files: its five options (``model=tiny`` ... ``model=huge``) are
:class:`ModelConfig` nodes built from :data:`HEAD_SIZES`, one row per encoder preset of
:data:`skysense.encoders.PRESETS` (the encoder's own sizes live there; the pre-training heads,
which the meta-architecture builds and the encoder never sees, are sized here).

:func:`register` puts the schemas and the model options in Hydra's ConfigStore; the primary
YAML files list their schema first in their defaults (``- pretrain_schema``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import MISSING


@dataclass
class HeadsConfig:
    """The pre-training projection heads (``conf/loss/default.yaml`` reads them): K prototypes,
    the MLP's hidden width and its bottleneck (DINOv2: 65536, 2048, 256)."""

    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256


# Encoder preset -> its pre-training heads. tiny and small are smaller than DINOv2's heads so that
# they train quickly; base, large and huge (= the paper) take DINOv2's.
HEAD_SIZES: dict[str, HeadsConfig] = {
    "tiny": HeadsConfig(n_prototypes=1024, hidden_dim=512, bottleneck_dim=128),
    "small": HeadsConfig(n_prototypes=16384),
    "base": HeadsConfig(),
    "large": HeadsConfig(),
    "huge": HeadsConfig(),
}


@dataclass
class ModelConfig:
    """``model=<preset>``: the SkySense encoder preset (``skysense.encoders.PRESETS``) and the
    pre-training heads sized for it.

    - ``preset``: tiny (tests, CPU), small, base, large, huge (= the paper).
    - ``checkpointing``: activation checkpointing per block (saves memory, costs a recompute).
    - ``overrides``: encoder config fields that replace the preset's, e.g.
      ``+model.overrides.fusion_depth=2`` (a new key takes the + of Hydra's append syntax).
    - ``heads``: see :class:`HeadsConfig` (``model.heads.n_prototypes=4096`` changes one).
    """

    preset: str = MISSING
    checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    heads: HeadsConfig = field(default_factory=HeadsConfig)


def model_config(preset: str) -> ModelConfig:
    """The ``model=<preset>`` option: the preset with its heads of :data:`HEAD_SIZES`."""
    return ModelConfig(preset=preset, heads=replace(HEAD_SIZES[preset]))


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
class TrainerConfig:
    """``trainer.*`` that pre-training and fine-tuning share: optimiser steps, samples per step,
    device (auto: CUDA when available, else the CPU), torch's CPU threads (null: its default)
    and how often a step is logged."""

    max_steps: int = 150
    batch_size: int = 8
    device: str = "auto"
    threads: int | None = None
    log_every: int = 1


@dataclass
class PretrainTrainerConfig(TrainerConfig):
    """``trainer.*`` of pre-training (``conf/trainer/default.yaml`` documents each)."""

    grad_accum: int = 1
    precision: str = "auto"
    nproc: int = 1
    strategy: str = "ddp"
    compile: bool = False
    teacher_momentum: float = 0.99
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
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
class FinetuneTrainerConfig(TrainerConfig):
    """``trainer.*`` of fine-tuning (``conf/finetune.yaml`` documents each)."""

    max_steps: int = 60
    log_every: int = 10
    eval_batch_size: int = 8
    num_workers: int = 0
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
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)


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
    """Store the schemas and the ``model`` options in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    for preset in HEAD_SIZES:
        cs.store(group="model", name=preset, node=model_config(preset))


def structured_options() -> dict[str, list[str]]:
    """Groups whose options are ConfigStore nodes (no YAML file) -> their options."""
    return {"model": list(HEAD_SIZES)}


def describe(group: str, option: str) -> str | None:
    """``--help``'s text for a ConfigStore option (``model=tiny``): the meaning of each key and
    the option's values as YAML; None where ``group`` has no such option."""
    import inspect

    from omegaconf import OmegaConf

    if group != "model" or option not in HEAD_SIZES:
        return None
    doc = inspect.getdoc(ModelConfig) or ""
    heads = inspect.getdoc(HeadsConfig) or ""
    body = OmegaConf.to_yaml(OmegaConf.structured(model_config(option))).rstrip()
    comments = "\n".join(f"# {line}".rstrip() for line in f"{doc}\n{heads}".splitlines())
    return f"{comments}\n{body}"

"""Typed schemas of the command-line configs (Hydra structured configs).

The dataclasses here give every field of the optimiser, the trainers and the top-level settings
its type and its default, so that a value of the wrong type (``optim.lr=abc``,
``trainer.max_steps=1.5``) or an unknown key is one line naming the field when the config is
composed, before any file or folder is created. The loss, task and pre-training source options
stay YAML files, untyped here; their own validation names the field.

Four groups are (wholly or partly) code, not YAML: ``model`` (five options, ``model=tiny`` ...
``model=huge``: :class:`ModelConfig` nodes built from :data:`HEAD_SIZES`, one row per encoder
preset of :data:`skysense.encoders.PRESETS`; the encoder's own sizes live there, the
pre-training heads, which the meta-architecture builds and the encoder never sees, are sized
here), ``optim`` (``adamw``: :class:`OptimConfig`, one source for pre-training and
fine-tuning), ``trainer`` (``default``: pre-training's :class:`PretrainTrainerConfig`;
fine-tuning's trainer block is :class:`FinetuneTrainerConfig`, both extend
:class:`TrainerConfig`) and ``data``'s downstream datasets (:mod:`skysense.tasks.conf.datasets`;
the pre-training sources ``embedded`` and ``shards`` stay YAML). Their docstrings say what each
field means; ``skysense <command> --help model=base`` (or ``data=oscd``) prints them.

:func:`register` puts the schemas and these options in Hydra's ConfigStore; the primary YAML
files list their schema first in their defaults (``- pretrain_schema``).
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
    """AdamW with warm-up + cosine learning rate and a cosine weight-decay schedule
    (``optim=adamw``, the one option; pre-training and fine-tuning read the same fields).

    name: adamw.
    lr: peak learning rate at ref_batch (see lr_scaling).
    min_lr: learning rate at the end of the cosine.
    lr_scaling: how lr follows the global batch: none (lr as given), linear (lr * batch /
      ref_batch) or sqrt; ref_batch: the batch lr is given for.
    weight_decay, weight_decay_end: pre-training decays with a cosine from weight_decay to
      weight_decay_end (DINO's recipe); fine-tuning keeps weight_decay constant.
    betas: AdamW's betas.
    warmup_steps: linear warm-up of the lr from 0.
    layer_decay: layer-wise lr decay (1.0 = off): deeper blocks keep more of the lr.
    grad_clip: gradient clipping by global norm (null: off; the follow-up recipe: 5).
    schedule: fine-tuning's lr schedule: cosine (warm-up, then cosine to min_lr) or multistep
      (PANGAEA's: after the warm-up, lr x gamma at each milestone, given as shares of the
      steps); pre-training always uses cosine.
    """

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
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.9])
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    """``trainer.*`` that pre-training and fine-tuning share.

    max_steps: optimizer steps to run (in total, counting steps before a resume).
    batch_size: the global batch (over all processes and accumulation steps).
    device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N.
    threads: torch CPU threads per process (null: torch's default, one per core). On a machine
      shared with other jobs, 1 is often several times faster: idle OpenMP threads spin while
      they wait for a descheduled sibling.
    log_every: steps between log lines.
    """

    max_steps: int = 150
    batch_size: int = 8
    device: str = "auto"
    threads: int | None = None
    log_every: int = 1


@dataclass
class PretrainTrainerConfig(TrainerConfig):
    """``trainer.*`` of pre-training (``trainer=default``, the one option).

    grad_accum: micro-batches per optimizer step.
    precision: auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16.
    nproc: processes on this machine (``skysense pretrain trainer.nproc=2`` launches torchrun
      itself); strategy: ddp or fsdp over them.
    compile: torch.compile the encoders.
    teacher_momentum: teacher EMA momentum at step 0 (cosine to 1 at the last step).
    checkpoint_every: steps between checkpoints; keep_checkpoints: how many are kept (older
      ones are removed).
    linear_probe: a linear probe of the teacher on the data's labelled splits, before and
      after training.
    health_every: label-free health signals of the teacher (RankMe, embedding spread, prototype
      entropies and usage, cross-modal retrieval, kNN where labelled) every N steps and at the
      end; 0: off.
    """

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
    """``trainer.*`` of fine-tuning (each task config sets its own max_steps / batch_size).

    eval_batch_size: samples (or windows of a scene) per forward in evaluation.
    num_workers: DataLoader worker processes (0: in the main process).
    val_fraction: validation split held out of the TRAINING data (0: none): whole scenes of
      dense data (at least one), images stratified by class otherwise; drawn by the seed.
      Change detection picks its decision threshold there (precision/recall curve in
      <init>/pr_curve.{json,png}).
    label_fraction: share of the remaining training labels trained on (scenes / tiles of dense
      data; images per class otherwise), drawn by the seed.
    eval_every, patience, min_delta: early stopping: score the validation split every
      eval_every steps (0: off); stop after ``patience`` evaluations without an improvement
      above min_delta (null: run the whole budget); either way the weights of the best
      evaluation are kept.
    val_metric: what the evaluations compare: score (the task's headline metric; change
      detection: F1 at the best threshold) or loss (image tasks: minus the mean validation
      loss, smoother than the accuracy of a few validation images).
    """

    max_steps: int = 60
    log_every: int = 10
    eval_batch_size: int = 8
    num_workers: int = 0
    val_fraction: float = 0.0
    label_fraction: float = 1.0
    eval_every: int = 0
    patience: int | None = None
    min_delta: float = 0.0
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
    """``skysense infer SRC DST checkpoint=MODEL``: a fine-tuned model (the model.pt that
    ``skysense finetune`` writes) over a scene of any size -> a Cloud-Optimized GeoTIFF on the
    scene's grid (a .geojson of boxes for detection models).

    src: a GeoTIFF stack or a folder of per-band GeoTIFFs of the model's input modality.
    dst: a .tif (class or probability map, COG); a .geojson for detection models.
    checkpoint: the fine-tuned model file.
    src2: change detection: the second date (same grid as src).
    extra: multi-modal models: the other modalities, e.g. {s1: path}, warped onto src's grid.
    window, overlap: window side and overlap in src pixels (null: the model's evaluation
      settings).
    batch_size: windows per forward pass.
    block: output block side in pixels: memory follows block^2, whatever the scene size.
    output: classes (uint8 class map, nodata 255) or probabilities (float32 per class, nodata
      NaN).
    overwrite: replace an existing dst.
    check_sensor: check the scene against the sensor the model was fine-tuned on (product
      level, band names and count, pixel size): a mismatch stops the run; false: run anyway.
    device: auto (CUDA when available, else the CPU).
    threads: CPU threads of torch's operators (null: torch's default).
    progress: a progress bar over the windows.
    """

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


SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


# The groups whose options are nodes of this module rather than YAML files: group -> option ->
# (the node, the classes whose docstrings say what each field means).
def _structured() -> dict[str, dict[str, tuple]]:
    from skysense.tasks.conf.datasets import DATASETS, DatasetConfig

    def mro(node) -> tuple[type, ...]:  # the dataset families, most general first
        return tuple(c for c in reversed(type(node).__mro__) if issubclass(c, DatasetConfig))

    return {
        "model": {p: (model_config(p), (ModelConfig, HeadsConfig)) for p in HEAD_SIZES},
        "optim": {"adamw": (OptimConfig(), (OptimConfig,))},
        "trainer": {"default": (PretrainTrainerConfig(), (TrainerConfig, PretrainTrainerConfig))},
        "data": {name: (node, mro(node), about) for name, (node, about) in DATASETS.items()},
    }


def register() -> None:
    """Store the schemas and the structured options (``model``, ``optim``, ``trainer``) in
    Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from skysense.tasks.conf.commands import PRIMARY

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    for name, node in PRIMARY.items():  # primary configs without a YAML file
        cs.store(name=name, node=node)
    for group, options in _structured().items():
        for option, (node, *_) in options.items():
            cs.store(group=group, name=option, node=node)


def structured_options() -> dict[str, list[str]]:
    """Groups whose options are ConfigStore nodes (no YAML file) -> their options."""
    return {group: list(options) for group, options in _structured().items()}


def _documented(node, classes=None, about: tuple[str, ...] = ()) -> str:
    """A dataclass node as ``--help`` shows it: ``about`` and the docstrings of ``classes``
    (default: the node's own classes and those of its nested sections) as ``#`` lines, then
    its values as YAML (without a defaults list)."""
    import dataclasses
    import inspect
    import textwrap

    from omegaconf import OmegaConf

    kind = node if isinstance(node, type) else type(node)
    if classes is None:
        classes = [c for c in reversed(kind.__mro__) if c is not object]
        for f in dataclasses.fields(kind):  # nested sections (export's head, convert's release)
            made = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(made):
                classes.append(type(made))
    lines = [textwrap.fill(a, 96, break_on_hyphens=False) for a in about]
    doc = "\n".join([*lines, *(inspect.getdoc(c) or "" for c in classes)])
    values = OmegaConf.to_container(OmegaConf.structured(node))
    values.pop("defaults", None)  # the groups it composes are listed above the keys
    comments = "\n".join(f"# {line}".rstrip() for line in doc.splitlines())
    return f"{comments}\n{OmegaConf.to_yaml(values).rstrip()}"


# Typed sections of the YAML primaries, shown by --help beside the file: config -> key -> node.
SECTIONS = {"finetune": {"trainer": FinetuneTrainerConfig}}


def describe_primary(config: str) -> str | None:
    """``--help``'s text for a primary config that is a dataclass (``ingest``, ``infer``, ...):
    its docstrings and defaults; None for a YAML primary."""
    from skysense.tasks.conf.commands import PRIMARY

    node = PRIMARY.get(config)
    return None if node is None else _documented(node)


def describe_sections(config: str) -> dict[str, str]:
    """``--help``'s text for the typed sections of a YAML primary (finetune's ``trainer``)."""
    return {key: _documented(node) for key, node in SECTIONS.get(config, {}).items()}


def describe(group: str, option: str) -> str | None:
    """``--help``'s text for a ConfigStore option (``model=tiny``, ``optim=adamw``): the meaning
    of each key and the option's values as YAML; None where ``group`` has no such option."""
    node, classes, *about = _structured().get(group, {}).get(option, (None, ()))
    return None if node is None else _documented(node, classes, tuple(about))

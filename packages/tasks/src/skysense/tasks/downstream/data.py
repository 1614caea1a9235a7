"""From a ``data`` config to what fine-tuning needs: training samples, evaluation items, class
names and a description of the model's input.

Each data config has a ``name`` that selects its builder here:

================  ==================================================  =========================
name              what                                                task kinds
================  ==================================================  =========================
oscd              OSCD city pairs + change masks                      change
osbs              HR GeoTIFF + box CSV/JSON (OSBS_029)                detection
geotiff_masks     GeoTIFF inputs + aligned label masks                segmentation
embedded          the data package's embedded sample (its labels)     classification
shards            ingested shards with labels (skysense ingest)       classification
================  ==================================================  =========================

Every name of :data:`skysense.data.datasets.REGISTRY` (class_folders, eurosat_ms, eurosat_rgb,
aid, resisc45, bigearthnet, bigearthnet_v2, levir_cd, whu_cd, ...) is built from its dataset
class by :func:`build_public`; OSCD reads through its class too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Attributes:
    train: index-addressable training samples (random crops / augmentations drawn per index).
    eval: evaluation items: whole :class:`DenseScene`\\ s (dense kinds),
        :class:`DetectionScene`\\ s (detection), or an iterable of batches (classification).
    classes: class names (index = class).
    kinds: the task kinds these labels serve.
    inputs: how the model is fed: ``modalities``, ``sensors`` (modality -> sensor name),
        ``reference`` (the grid dense outputs are on), and per modality ``bands``, ``mean``,
        ``std``; `skysense infer` reads a scene with this.
    class_weights: suggested cross-entropy weights (dense kinds), or None.
    train_batches, eval_batches: for data that comes batched (manifests): callables
        ``batch_size -> iterable of batches`` used instead of ``train`` / ``eval``.
    """

    train: Dataset
    eval: Any
    classes: list[str]
    kinds: tuple[str, ...]
    inputs: dict
    class_weights: list[float] | None = None
    info: dict = field(default_factory=dict)
    train_batches: Any = None
    eval_batches: Any = None


def _sensor_inputs(sensors: Mapping[str, str], reference: str) -> dict:
    from skysense.data.sensors import get_sensor

    out = {"modalities": list(sensors), "sensors": dict(sensors), "reference": reference}
    for m, name in sensors.items():
        spec = get_sensor(name)
        out[m] = {"bands": list(spec.model_bands), "mean": list(spec.mean), "std": list(spec.std)}
    return out


def _root(cfg) -> Path:
    root = Path(str(cfg.root)).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data.root {root} does not exist (data={cfg.name}; set data.root=... or "
            "SKYSENSE_SHARED_DATA)"
        )
    return root


def build_oscd(cfg, length: int, seed: int) -> TaskData:
    """OSCD through :class:`skysense.data.datasets.oscd.OSCD` (date 2 resampled onto date 1's
    grid): whole cities in memory, training crops focused on change pixels."""
    from skysense.data.datasets import get_dataset
    from skysense.tasks.downstream.datasets.dense import DenseCrops, class_weights
    from skysense.tasks.downstream.datasets.public import Scenes, build_split

    root = _root(cfg)
    cls = get_dataset("oscd")
    train_ds = build_split(cls, cfg, "train", "train") if length else None
    val_ds = build_split(cls, cfg, cfg.get("val_split", "val"), "val")
    train = [Scenes(train_ds)[i] for i in range(len(train_ds))] if length else []
    val = [Scenes(val_ds)[i] for i in range(len(val_ds))]
    ds = (
        DenseCrops(
            train,
            cfg.crop,
            length,
            seed,
            focus_class=1,
            focus=cfg.change_focus,
            augment=cfg.augment,
        )
        if length
        else None
    )
    inputs = val_ds.inputs()
    inputs["reference"] = "s2"
    log.info("oscd %s: train %s, val %s", root, [s.name for s in train], [s.name for s in val])
    return TaskData(
        ds,
        val,
        list(cls.classes),
        ("change",),
        inputs,
        class_weights(train, 2) if train else None,
        {
            "train": [s.name for s in train],
            "val": [s.name for s in val],
            "counts": {"train": _change_counts(train), "val": _change_counts(val)},
        },
    )


def _change_counts(scenes) -> dict:
    """Scenes, pixels, labelled pixels, change pixels and the change share of labelled pixels
    of change scenes (mask: 0 no change, 1 change, IGNORE_INDEX unlabelled)."""
    from skysense.tasks.downstream.datasets.common import IGNORE_INDEX

    px = sum(int(s.mask.numel()) for s in scenes)
    lab = sum(int((s.mask != IGNORE_INDEX).sum()) for s in scenes)
    chg = sum(int((s.mask == 1).sum()) for s in scenes)
    return {"scenes": len(scenes), "pixels": px, "labelled_pixels": lab, "change_pixels": chg,
            "change_fraction": chg / lab if lab else None}  # fmt: skip


def build_public(cfg, length: int, seed: int, source: str | None = None) -> TaskData:
    """A dataset class of :mod:`skysense.data.datasets` (see
    :mod:`skysense.tasks.downstream.datasets.public`)."""
    from skysense.data.datasets import get_dataset
    from skysense.tasks.downstream.datasets.public import (
        BoxCrops,
        DetectionScenes,
        ItemCycle,
        Scenes,
        TileCrops,
        build_split,
        class_weights_of,
    )

    cls = get_dataset(cfg.name)
    _root(cfg)
    train_ds = build_split(cls, cfg, cfg.get("train_split", "train"), "train") if length else None
    val_ds = build_split(cls, cfg, cfg.get("val_split", "val"), "val")
    if train_ds is not None and list(train_ds.classes) != list(val_ds.classes):
        raise ValueError(
            f"data={cfg.name}: the evaluation split's classes {list(val_ds.classes)} differ from "
            f"the training split's {list(train_ds.classes)}"
        )
    kind = cls.task
    augment = bool(cfg.get("augment", True))
    classes = list(val_ds.classes)
    inputs = val_ds.inputs()
    mods = inputs["modalities"]
    inputs["reference"] = source if source in mods else mods[0]
    weights = None
    if kind in ("classification", "multilabel"):
        train = ItemCycle(train_ds, length, seed, augment, cfg.get("crop")) if length else None
        ev = val_ds
    elif kind in ("segmentation", "change"):
        train = TileCrops(train_ds, cfg.get("crop"), length, seed, augment) if length else None
        ev = Scenes(val_ds, cfg.get("max_eval"))
        weights = class_weights_of(train_ds, len(classes)) if length else None
    elif kind == "detection":
        train = (
            BoxCrops(train_ds, cfg.get("crop"), length, seed, cfg.get("min_visible", 0.5), augment)
            if length
            else None
        )
        ev = DetectionScenes(val_ds, cfg.get("max_eval"))
    else:
        raise NotImplementedError(f"data={cfg.name}: task kind {kind!r} has no downstream wiring")
    n_train = len(train_ds) if train_ds is not None else 0
    log.info(
        "%s (%s): %d train / %d %s items, sensors %s, %d classes",
        cfg.name, kind, n_train, len(val_ds), val_ds.split, inputs["sensors"], len(classes),
    )  # fmt: skip
    return TaskData(
        train,
        ev,
        classes,
        (kind,),
        inputs,
        weights,
        {"train": n_train, "val": len(val_ds), "dataset": val_ds.describe()},
    )


def build_boxes(cfg, length: int, seed: int) -> TaskData:
    from skysense.tasks.downstream.datasets.boxes import DetectionCrops, load_detection_scene

    root = _root(cfg)
    scene, classes = load_detection_scene(
        root / cfg.image, root / cfg.boxes, cfg.get("classes"), cfg.sensor
    )
    w = scene.hr.shape[-1]
    cut = int(round(cfg.train_fraction * w))
    train, val = scene.columns(0, cut), scene.columns(cut, w)
    ds = (
        DetectionCrops([train], cfg.crop, length, seed, cfg.min_visible, cfg.augment)
        if length
        else None
    )
    log.info(
        "detection: %d training boxes (columns < %d), %d held-out boxes",
        len(train.boxes),
        cut,
        len(val.boxes),
    )
    return TaskData(
        ds,
        [val],
        classes,
        ("detection",),
        _sensor_inputs({"hr": cfg.sensor}, "hr"),
        info={"train_columns": [0, cut], "val_columns": [cut, w]},
    )


def build_geotiff_masks(cfg, length: int, seed: int, source: str | None = None) -> TaskData:
    from skysense.kernels.modalities import DEFAULT_SENSORS
    from skysense.tasks.downstream.datasets.dense import DenseCrops
    from skysense.tasks.downstream.datasets.segmentation import load_scenes

    root = Path(str(cfg.root)) if cfg.get("root") else None
    values = (
        {int(k): int(v) for k, v in dict(cfg.label_values).items()}
        if cfg.get("label_values")
        else None
    )
    sensors = {**DEFAULT_SENSORS, **dict(cfg.get("sensors") or {})}
    kw = dict(reference=source, sensors=sensors, values=values, root=root)
    train = load_scenes(list(cfg.train_scenes), **kw) if length else []
    val = load_scenes(list(cfg.val_scenes), **kw)
    classes = list(cfg.classes)
    mods = [m for m in MODALITIES if any(m in s.sample for s in train or val)]
    ref = source if source in mods else next(m for m in ("s2", "s1", "hr") if m in mods)
    ds = DenseCrops(train, cfg.crop, length, seed, augment=cfg.augment) if length else None
    return TaskData(
        ds,
        val,
        classes,
        ("segmentation",),
        _sensor_inputs({m: sensors[m] for m in mods}, ref),
        info={
            "train": len(train),
            "val": len(val),
            "train_scenes": [s.name for s in train],
            "val_scenes": [s.name for s in val],
        },
    )


BUILDERS = {
    "eolearn_slovenia": None,  # skysense.tasks.benchmark.slovenia.slovenia_task_data
    "oscd": build_oscd,
    "osbs": build_boxes,
    "geotiff_masks": build_geotiff_masks,
}


def build_task_data(data_cfg, length: int, seed: int, source: str | None = None) -> TaskData:
    """The data of ``data_cfg`` with ``length`` training items (0: evaluation data only)."""
    name = data_cfg.get("name")
    if name in ("embedded", "shards"):
        from skysense.tasks.downstream.datasets.manifest import build_manifest_data

        return build_manifest_data(data_cfg, length, seed, source)
    from skysense.data.datasets import MISSING, REGISTRY

    if name not in BUILDERS and (name in REGISTRY or name in MISSING):
        return build_public(data_cfg, length, seed, source)
    if name not in BUILDERS:
        raise ValueError(
            f"data.name {name!r} has no downstream builder; known: "
            f"{sorted(set(BUILDERS) | set(REGISTRY)) + ['embedded', 'shards']}"
        )
    if name == "geotiff_masks":
        return build_geotiff_masks(data_cfg, length, seed, source)
    if name == "eolearn_slovenia":  # the benchmark's series patch (shared sample)
        from skysense.tasks.benchmark.slovenia import slovenia_task_data

        return slovenia_task_data(data_cfg, length, seed, source)
    return BUILDERS[name](data_cfg, length, seed)

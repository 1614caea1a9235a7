"""From a ``data`` config to what fine-tuning needs: training samples, evaluation items, class
names and a description of the model's input.

Each data config has a ``name`` that selects its builder here:

================  ==================================================  =========================
name              what                                                task kinds
================  ==================================================  =========================
oscd              OSCD city pairs + change masks                      change
bigearthnet       BigEarthNet S2 / S1 / S2+S1 patches, multi-labels   multilabel
boxes             HR GeoTIFF + box CSV/JSON (OSBS_029)                detection
class_folders     root/<class>/<image>                                classification
geotiff_masks     GeoTIFF inputs + aligned label masks                segmentation
embedded          the data package's embedded sample (its labels)     classification
shards            ingested shards with labels (skysense ingest)       classification
================  ==================================================  =========================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

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
    from skysense.tasks.downstream.datasets.dense import DenseCrops, class_weights
    from skysense.tasks.downstream.datasets.oscd import load_oscd_city

    root = _root(cfg)
    values = {int(k): int(v) for k, v in dict(cfg.label_values).items()}
    train = (
        [load_oscd_city(root, c, cfg.sensor, values) for c in cfg.train_cities] if length else []
    )
    val = [load_oscd_city(root, c, cfg.sensor, values) for c in cfg.val_cities]
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
    return TaskData(
        ds,
        val,
        ["no change", "change"],
        ("change",),
        _sensor_inputs({"s2": cfg.sensor}, "s2"),
        class_weights(train, 2) if train else None,
        {"train": list(cfg.train_cities), "val": list(cfg.val_cities)},
    )


def build_bigearthnet(cfg, length: int, seed: int) -> TaskData:
    from skysense.tasks.downstream.datasets.bigearthnet import (
        S1_SENSOR,
        S2_SENSOR,
        MultiLabelPatches,
        find_patches,
        load_patch,
    )

    mods = list(cfg.modalities)
    if not mods or any(m not in ("s2", "s1") for m in mods):
        raise ValueError(f"data.modalities must be a non-empty subset of [s2, s1], got {mods}")
    patches = find_patches(_root(cfg))
    classes = (
        list(cfg.classes)
        if cfg.get("classes")
        else sorted({x for p in patches for x in p["labels"]})
    )
    samples = [load_patch(p, mods, classes) for p in patches if all(p[m] is not None for m in mods)]
    if len(samples) <= cfg.n_val:
        raise ValueError(
            f"{len(samples)} BigEarthNet patches with {mods}: too few for n_val={cfg.n_val}"
        )
    train, val = samples[: -cfg.n_val], samples[-cfg.n_val :]
    names = [p["name"] for p in patches]
    ds = (
        MultiLabelPatches(train, length, crop=cfg.get("crop"), augment=cfg.augment, seed=seed)
        if length
        else None
    )
    sensors = {m: (S2_SENSOR if m == "s2" else S1_SENSOR) for m in mods}
    return TaskData(
        ds,
        MultiLabelPatches(val),
        classes,
        ("multilabel",),
        _sensor_inputs(sensors, mods[0]),
        info={"train": names[: -cfg.n_val], "val": names[-cfg.n_val :]},
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


def build_class_folders(cfg, length: int, seed: int) -> TaskData:
    from skysense.tasks.downstream.datasets.class_folders import (
        ClassFolderDataset,
        find_class_folders,
        split_items,
    )

    items, classes = find_class_folders(_root(cfg))
    if cfg.get("val_root"):
        val_items, val_classes = find_class_folders(Path(str(cfg.val_root)))
        if val_classes != classes:
            raise ValueError(
                f"data.val_root classes {val_classes} differ from data.root's {classes}"
            )
        train_items = items
    else:
        train_items, val_items = split_items(items, cfg.val_fraction, seed)
    train = (
        ClassFolderDataset(train_items, cfg.size, cfg.sensor, cfg.augment, seed, length)
        if length
        else None
    )
    val = ClassFolderDataset(val_items, cfg.size, cfg.sensor)
    return TaskData(
        train, val, classes, ("classification",), _sensor_inputs({"hr": cfg.sensor}, "hr")
    )


def build_geotiff_masks(cfg, length: int, seed: int, source: str | None = None) -> TaskData:
    from skysense.tasks.downstream.datasets.dense import DenseCrops
    from skysense.tasks.downstream.datasets.segmentation import DEFAULT_SENSORS, load_scenes

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
    mods = [m for m in ("hr", "s2", "s1") if any(m in s.sample for s in train or val)]
    ref = source if source in mods else next(m for m in ("s2", "s1", "hr") if m in mods)
    ds = DenseCrops(train, cfg.crop, length, seed, augment=cfg.augment) if length else None
    return TaskData(
        ds, val, classes, ("segmentation",), _sensor_inputs({m: sensors[m] for m in mods}, ref)
    )


BUILDERS = {
    "oscd": build_oscd,
    "bigearthnet": build_bigearthnet,
    "boxes": build_boxes,
    "class_folders": build_class_folders,
    "geotiff_masks": build_geotiff_masks,
}


def build_task_data(data_cfg, length: int, seed: int, source: str | None = None) -> TaskData:
    """The data of ``data_cfg`` with ``length`` training items (0: evaluation data only)."""
    name = data_cfg.get("name")
    if name in ("embedded", "shards"):
        from skysense.tasks.downstream.datasets.manifest import build_manifest_data

        return build_manifest_data(data_cfg, length, seed, source)
    if name not in BUILDERS:
        raise ValueError(
            f"data.name {name!r} has no downstream builder; known: {sorted(BUILDERS) + ['embedded', 'shards']}"
        )
    if name == "geotiff_masks":
        return build_geotiff_masks(data_cfg, length, seed, source)
    return BUILDERS[name](data_cfg, length, seed)

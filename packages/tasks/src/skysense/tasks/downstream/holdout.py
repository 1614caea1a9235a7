"""A validation split carved out of the training data, and a share of the training labels.

Fine-tuning scores on the data's held-out split; choosing anything on that split (when to stop,
change detection's decision threshold) would leak. :func:`carve` therefore holds out part of the
*training* data as a validation split (``val_fraction``, chosen by ``seed``) and keeps a
``label_fraction`` of the rest for training (also chosen by ``seed``):

- dense data read whole into memory (OSCD cities, GeoTIFF scenes: :class:`DenseCrops`): whole
  scenes; at least one scene for validation and one for training;
- dense datasets read tile by tile (:class:`TileCrops`): whole tiles;
- image classification (:class:`ItemCycle`, manifests): images, stratified by class where the
  labels are single class indices (a seeded share of each class, at least one image of each),
  a seeded random share for multi-label data;
- detection datasets (:class:`BoxCrops`: DIOR, DIOR-R, FAIR1M): whole images.

The validation split is returned as a :class:`TaskData` whose ``eval`` / ``eval_batches`` hold
it (no augmentation), so the same evaluation code scores it. A single labelled detection scene
split by a line (data=osbs) is not carved (NotImplementedError).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import torch
from omegaconf import OmegaConf

from skysense.tasks.downstream.data import TaskData

log = logging.getLogger(__name__)


def choose(n: int, val_fraction: float, label_fraction: float, seed: int,
           labels: torch.Tensor | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """(training indices kept, validation indices) of ``n`` items, both sorted.

    ``labels`` (n,) int64 class indices stratify both draws (each class split on its own);
    without them the draws are plain seeded permutations. Validation takes
    ``round(val_fraction * n)`` items (at least one when ``val_fraction`` > 0, never all; none,
    with a warning, when there is a single item);
    training keeps ``label_fraction`` of the rest (at least one item, per class when
    stratified)."""
    from skysense.tasks.benchmark.probes import stratified_subset

    if n < 1:
        raise ValueError("no training item to split")
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n)
    val = torch.zeros(n, dtype=torch.bool)
    if val_fraction > 0 and n < 2:
        log.warning(
            "val_fraction %s: one training item cannot be split; no validation", val_fraction
        )
    elif val_fraction > 0:
        if labels is not None:
            val[stratified_subset(labels, val_fraction, seed + 7919)] = True
            if val.all():
                val[0] = False
        else:
            k = min(n - 1, max(1, round(val_fraction * n)))
            val[torch.randperm(n, generator=g)[:k]] = True
    rest = idx[~val]
    if label_fraction < 1.0:
        sub = labels[rest] if labels is not None else torch.zeros(len(rest), dtype=torch.long)
        rest = rest[stratified_subset(sub, label_fraction, seed)]
    return rest.tolist(), idx[val].tolist()


def _subset_dataset(ds, keep: list[int]):
    """A copy of a dataset class instance holding only the items ``keep`` (its ``items``
    list), or a torch Subset for datasets without one."""
    if isinstance(getattr(ds, "items", None), list):
        out = copy.copy(ds)
        out.items = [ds.items[i] for i in keep]
        return out
    return torch.utils.data.Subset(ds, keep)


def _item_labels(ds) -> torch.Tensor | None:
    items = getattr(ds, "items", None)
    if (
        isinstance(items, list)
        and items
        and all(isinstance(it, dict) and isinstance(it.get("label"), int) for it in items)
    ):
        return torch.tensor([it["label"] for it in items], dtype=torch.long)
    return None


def carve(data: TaskData, data_cfg, length: int, seed: int, source: str | None,
          val_fraction: float, label_fraction: float = 1.0) -> tuple[TaskData, TaskData | None]:  # fmt: skip
    """(training data reduced to the kept share, validation data or None when
    ``val_fraction`` is 0). ``data`` is what :func:`build_task_data` gave for ``data_cfg`` with
    ``length`` training items; ``data.info`` gains a ``holdout`` record (what was held out,
    the label fraction and the counts)."""
    from skysense.tasks.downstream.datasets.dense import DenseCrops, class_weights
    from skysense.tasks.downstream.datasets.public import (
        BoxCrops,
        DetectionScenes,
        ItemCycle,
        Scenes,
        TileCrops,
    )

    vf, lf = float(val_fraction), float(label_fraction)
    if not 0.0 <= vf < 1.0 or not 0.0 < lf <= 1.0:
        raise ValueError(f"val_fraction {vf} must be in [0, 1), label_fraction {lf} in (0, 1]")
    n_classes = len(data.classes)
    tr, val = data.train, None
    if data.train_batches is not None:
        return _carve_manifest(data, data_cfg, length, seed, source, vf, lf)
    if isinstance(tr, DenseCrops):
        names = [str(s.name) for s in tr.scenes]
        keep, held = choose(len(tr.scenes), vf, lf, seed)
        new = copy.copy(tr)
        new.scenes = [tr.scenes[i] for i in keep]
        new.focus_px = [tr.focus_px[i] for i in keep]
        areas = torch.tensor([s.mask.numel() for s in new.scenes], dtype=torch.float64)
        new.p = (areas / areas.sum()).numpy()
        weights = class_weights(new.scenes, n_classes) if data.class_weights else None
        if held:
            val = replace(data, train=None, eval=[tr.scenes[i] for i in held])
        rec = {"unit": "scenes", "train": [names[i] for i in keep],
               "validation": [names[i] for i in held]}  # fmt: skip
    elif isinstance(tr, (TileCrops, ItemCycle)):
        labels = _item_labels(tr.ds) if isinstance(tr, ItemCycle) else None
        keep, held = choose(len(tr.ds), vf, lf, seed, labels)
        new = copy.copy(tr)
        new.ds = _subset_dataset(tr.ds, keep)
        weights = data.class_weights
        if isinstance(tr, TileCrops):
            from skysense.tasks.downstream.datasets.public import class_weights_of

            if weights is not None:
                weights = class_weights_of(new.ds, n_classes)
            if held:
                val = replace(data, train=None, eval=Scenes(_subset_dataset(tr.ds, held)))
        elif held:
            val = replace(data, train=None, eval=_subset_dataset(tr.ds, held))
        rec = {"unit": "tiles" if isinstance(tr, TileCrops) else "images",
               "train": len(keep), "validation": len(held),
               "stratified": labels is not None}  # fmt: skip
    elif isinstance(tr, BoxCrops):  # detection datasets: whole images (not stratified)
        keep, held = choose(len(tr.ds), vf, lf, seed)
        new = copy.copy(tr)
        new.ds = _subset_dataset(tr.ds, keep)
        weights = data.class_weights
        if held:
            val = replace(data, train=None, eval=DetectionScenes(_subset_dataset(tr.ds, held)))
        rec = {"unit": "images", "train": len(keep), "validation": len(held),
               "stratified": False}  # fmt: skip
    else:
        raise NotImplementedError(
            f"a validation split / label fraction of {type(tr).__name__} training data "
            f"(data={data_cfg.get('name')}) is not implemented"
        )
    rec.update(val_fraction=vf, label_fraction=lf, seed=seed)
    info = {**data.info, "holdout": rec}
    log.info("holdout (%s): %s", data_cfg.get("name"), rec)
    out = replace(data, train=new, class_weights=weights, info=info)
    return out, (replace(val, info=info) if val is not None else None)


def _carve_manifest(data, data_cfg, length, seed, source, vf, lf):
    """Manifests: the samples of the training split relabelled (kept / validation / unused) in
    a copy of the manifest's sample table, and the loaders rebuilt on that copy."""
    import numpy as np

    from skysense.data.manifest import Manifest
    from skysense.tasks.downstream.datasets.manifest import build_manifest_data

    plain = OmegaConf.to_container(data_cfg, resolve=True)
    if plain.get("name") == "embedded":
        from skysense.data.embedded import ensure_embedded

        path = ensure_embedded(str(plain["root"]), plain["n_samples"], plain["seed"])
    else:
        path = plain["manifest"]
    man = Manifest(path)
    split = plain.get("split", "train")
    ids = man.split_ids(split)
    lab = man.samples.label[ids]
    labels = torch.from_numpy(lab) if man.label_kind == "single" and (lab >= 0).all() else None
    keep, held = choose(len(ids), vf, lf, seed, labels)
    sub = copy.copy(man)
    new_split = np.array(man.samples.split, dtype=object)
    new_split[ids] = "holdout_unused"
    new_split[ids[keep]] = "holdout_train"
    new_split[ids[held]] = "holdout_val"
    sub.samples = replace(man.samples, split=new_split)
    cfg = OmegaConf.create({**plain, "split": "holdout_train", "val_split": "holdout_val"})
    rec = {"unit": "images", "train": len(keep), "validation": len(held),
           "stratified": labels is not None, "val_fraction": vf, "label_fraction": lf,
           "seed": seed}  # fmt: skip
    info = {**data.info, "holdout": rec}
    carved = build_manifest_data(cfg, length, seed, source, manifest=sub)
    out = replace(data, train_batches=carved.train_batches, info=info)
    val = replace(data, train_batches=None, eval_batches=carved.eval_batches, info=info)
    log.info("holdout (%s): %s", plain.get("name"), rec)
    return out, (val if held else None)


def val_fraction_of(cfg) -> float:
    """``trainer.val_fraction`` (0 when unset)."""
    v = cfg.trainer.get("val_fraction")
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

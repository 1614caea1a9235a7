"""Labelled samples from an ingested manifest (the data package's shards): the embedded sample
(``data=embedded``, generated on first use) or any ``skysense ingest`` output with labels
(``data=shards``). Batches come from :func:`skysense.data.build_loader` as they are (contract
batches with ``label``); the split names are the config's ``split`` / ``val_split``.
"""

from __future__ import annotations

import logging

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)

# The sensors whose statistics the loader's "spec" normalisation uses, per modality.
SPEC_SENSORS = {"hr": "hr_rgb", "s2": "s2_l2a", "s1": "s1_grd_db"}


def build_manifest_data(cfg, length: int, seed: int, source: str | None = None, manifest=None):
    """``manifest``: an open :class:`Manifest` to read instead of the config's (the
    validation hold-out of :mod:`skysense.tasks.downstream.holdout` passes one whose splits it
    relabelled)."""
    from skysense.data import build_loader
    from skysense.data.manifest import Manifest
    from skysense.tasks.downstream.data import TaskData, _sensor_inputs

    if manifest is not None:
        pass  # given, relabelled
    elif cfg.name == "embedded":
        from skysense.data.embedded import ensure_embedded

        manifest = ensure_embedded(str(cfg.root), cfg.n_samples, cfg.seed)
    else:
        manifest = cfg.manifest
    man = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
    # a given (relabelled) table is read as is; else each loader opens the file itself
    src = man if isinstance(manifest, Manifest) else man.path
    kind = {"single": "classification", "multi": "multilabel"}.get(man.label_kind)
    if kind is None or not man.classes:
        raise ValueError(
            f"manifest {man.path} has no class labels (label kind {man.label_kind!r}); "
            "fine-tuning needs labelled samples"
        )
    if cfg.get("modalities"):
        mods = list(cfg.modalities)
    elif source in MODALITIES:
        mods = [source]
    else:
        mods = list(man.modalities)
    bad = [m for m in mods if m not in man.modalities]
    if bad:
        raise ValueError(f"manifest {man.path} holds {list(man.modalities)}, not {bad}")
    split, val_split = cfg.get("split", "train"), cfg.get("val_split", "val")
    backend, workers = cfg.get("backend", "auto"), cfg.get("num_workers", 0)
    norm = cfg.get("normalisation", "spec")

    def train_batches(batch_size: int):
        return build_loader(
            src,
            split,
            batch_size,
            backend,
            seed=seed,
            epochs=None,
            shuffle=True,
            drop_last=True,
            modalities=mods,
            num_workers=workers,
            normalisation=norm,
        )

    def eval_batches(batch_size: int):
        return build_loader(
            src,
            val_split,
            batch_size,
            backend,
            seed=seed,
            epochs=1,
            shuffle=False,
            drop_last=False,
            modalities=mods,
            num_workers=workers,
            normalisation=norm,
        )

    ref = next(m for m in MODALITIES if m in mods) if source not in mods else source
    n_train, n_val = len(man.split_ids(split)), len(man.split_ids(val_split))
    log.info(
        "%s: %d train / %d %s samples, modalities %s, classes %s",
        man.path,
        n_train,
        n_val,
        val_split,
        mods,
        man.classes,
    )
    return TaskData(
        train=None,
        eval=None,
        classes=list(man.classes),
        kinds=(kind,),
        inputs=_sensor_inputs({m: SPEC_SENSORS[m] for m in mods}, ref),
        info={"manifest": str(man.path), "train": n_train, "val": n_val, "modalities": mods},
        train_batches=train_batches,
        eval_batches=eval_batches,
    )

"""``build_loader``: a manifest -> an iterable of batch dicts (the contract of ``batch.py``).

Two backends give the same batches from the same seed: DALI (a pipeline fed through
``external_source``; CPU operators here, GPU operators on a CUDA machine) and a torch
``DataLoader`` (numpy and the C++ kernel, in ``num_workers`` processes). ``backend="auto"``
takes DALI where it imports, torch otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from skysense.data.assemble import BatchAssembler
from skysense.data.manifest import Manifest
from skysense.data.schedule import BatchSchedule
from skysense.data.views import ViewConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")


def dali_available() -> bool:
    """True when NVIDIA DALI imports (its CPU operators run without a GPU)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


class Loader:
    """An iterable of batches; ``len()`` when finite. Built by :func:`build_loader`.

    Attributes:
        backend: "dali" or "torch" (what runs).
        schedule: the :class:`~skysense.data.schedule.BatchSchedule` (batches_per_epoch, ...).
        assembler: the :class:`~skysense.data.assemble.BatchAssembler`.
    """

    def __init__(self, assembler: BatchAssembler, backend: str, num_workers: int, **opts):
        self.assembler = assembler
        self.schedule = assembler.schedule
        self.backend = backend
        self.num_workers = num_workers
        self.opts = opts
        self._dali = None

    @property
    def batches_per_epoch(self) -> int:
        return self.schedule.batches_per_epoch

    def __len__(self) -> int:
        return len(self.schedule)

    def __iter__(self) -> Iterator[dict]:
        if self.backend == "dali":
            from skysense.data.dali_pipeline import DaliBatches

            if self._dali is None:  # one pipeline for every epoch (building one takes a while)
                self._dali = DaliBatches(
                    self.assembler, num_threads=max(1, self.num_workers), **self.opts
                )
            yield from self._dali
            return
        yield from _torch_batches(self.assembler, self.num_workers, **self.opts)


class _BatchDataset(torch.utils.data.Dataset):
    """Item ``g`` is this rank's whole batch of global batch ``g`` (order decided upstream)."""

    def __init__(self, assembler: BatchAssembler):
        self.assembler = assembler

    def __getitem__(self, g: int):
        return self.assembler.build(int(g))

    def __len__(self):  # the sampler decides what is asked for; this bounds nothing
        return 2**62


def _identity(x):
    return x


def _torch_batches(assembler, num_workers, pin_memory=False, prefetch_factor=2, **_):
    if num_workers == 0:
        for g in assembler.schedule:
            yield assembler.build(g)
        return
    dl = torch.utils.data.DataLoader(
        _BatchDataset(assembler),
        batch_size=None,
        sampler=assembler.schedule,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        persistent_workers=False,
    )
    yield from dl


def build_loader(
    manifest,
    split: str | None = "train",
    batch_size: int = 8,
    backend: str = "auto",
    *,
    views: bool = False,
    view_config: ViewConfig | dict | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    shuffle: bool | None = None,
    epochs: int | None = 1,
    modalities=None,
    normalisation: str = "spec",
    pin_memory: bool = False,
    device: str | None = None,
) -> Loader:
    """Batches of ``split`` from an ingested manifest.

    Args:
        manifest: path of ``manifest.sqlite`` (or its folder), or a :class:`Manifest`.
        split: "train", "val", "test", or None / "all".
        batch_size: samples per batch on this rank.
        backend: "auto" (DALI where installed, else torch), "dali" or "torch".
        views: yield ``{"view1": batch, "view2": batch}`` (pre-training views, see
            :class:`~skysense.data.views.ViewConfig`) instead of whole tiles.
        view_config: a :class:`ViewConfig` or a dict of its fields.
        seed: seeds the order (per epoch) and every random view choice (per epoch and sample).
        rank, world_size: this process's part of each global batch of
            ``batch_size x world_size`` samples (concatenated in rank order = the global batch).
        start_batch: the global batch index to start from (resume exactly where a run stopped).
        num_workers: torch: DataLoader worker processes; DALI: CPU threads.
        drop_last: drop an epoch's last short batch (default: True in views mode, else False).
        shuffle: reshuffle each epoch (default: True for the train split).
        epochs: epochs to yield, or None for endless iteration.
        modalities: subset of ("hr", "s2", "s1") to load (default: all of the manifest).
        normalisation: "spec" (the sensors' statistics of the released weights) or "data" (the
            manifest's per-band statistics).
        pin_memory: torch backend: pin batches for faster host-to-GPU copies.
        device: DALI backend: "cpu" (default) or "gpu" operators (the GPU placement is
            written but has not been run on a GPU yet).

    Returns:
        a :class:`Loader`: iterate it for batch dicts (shapes in :mod:`skysense.data.batch`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise RuntimeError(
            "backend='dali' asked for but nvidia.dali does not import; install the extra "
            "`skysense-data[dali]` or use backend='torch'"
        )
    m = manifest if isinstance(manifest, Manifest) else Manifest(Path(manifest))
    ids = m.split_ids(split)
    if shuffle is None:
        shuffle = split == "train"
    if drop_last is None:
        drop_last = bool(views)
    schedule = BatchSchedule(
        ids,
        batch_size,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        epochs=epochs,
        start_batch=start_batch,
    )
    assembler = BatchAssembler(
        m,
        schedule,
        modalities=modalities,
        views=views,
        view_config=view_config,
        seed=seed,
        normalisation=normalisation,
    )
    opts = {"pin_memory": pin_memory} if backend == "torch" else {"device": device}
    log.info(
        "loader: %s backend, split %s, %d samples, %d batches/epoch of %d (rank %d/%d)",
        backend,
        split,
        len(ids),
        schedule.batches_per_epoch,
        batch_size,
        rank,
        world_size,
    )
    return Loader(assembler, backend, num_workers, **opts)


def resolve_manifest(data_cfg) -> Path:
    """The manifest a ``conf/data/*.yaml`` config points at (a dict or an OmegaConf node).

    ``name: embedded`` -> :func:`~skysense.data.embedded.ensure_embedded` (``root``,
    ``n_samples``, ``seed``: made on first use); anything else -> its ``manifest`` field.
    """
    get = data_cfg.get if hasattr(data_cfg, "get") else lambda k, d=None: getattr(data_cfg, k, d)
    if get("name") == "embedded":
        from skysense.data.embedded import ensure_embedded

        return ensure_embedded(
            get("root"), n_samples=int(get("n_samples", 48)), seed=int(get("seed", 0))
        )
    manifest = get("manifest")
    if not manifest:
        raise ValueError(
            "data config has no `manifest` (the DST/manifest.sqlite of `skysense ingest`)"
        )
    return Path(str(manifest))

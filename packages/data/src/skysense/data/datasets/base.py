"""What every public-dataset reader shares: the declaration of what it holds (sensors, bands in
file order, resolution, CRS handling, classes, label encoding, split files), the sample format
it returns, and ``plot()``.

A dataset is built from a root folder in exactly the layout the dataset is distributed in and
one split (``train``, ``val`` or ``test``) taken from the dataset's own split files, or from
``split_file`` (a text file of item names, one a line) when given. Item ``i`` is a *sample* in
the keys of the batch contract without the batch dimension:

=================  ===============================  ==============================================
key                shape, dtype                     meaning
=================  ===============================  ==============================================
``hr``             (3, H, W) float32                HR RGB, normalised (ImageNet statistics)
``s2``             (T, 10, h, w) float32            Sentinel-2, the model's 10 bands by name,
                                                    normalised (the spec's statistics)
``s2_doy``         (T,) int64                       day of year, 0 = unknown date
``s2_valid``       (T,) bool                        step present
``s2_pixel_valid`` (T, h, w) bool                   pixel has data in every band
``s1`` ...         (T, 2, h, w) ...                 Sentinel-1 VV, VH in dB, likewise
``latlon``         (2,) float32                     centre lat/lon (NaN where not georeferenced)
``label``          () int64 / (K,) float32          class index / multi-hot (multi-label)
``mask``           (H, W) int64                     class per pixel, 255 = ignore
``boxes``          (M, 4) float32, ``labels`` (M,)  horizontal boxes x0 y0 x1 y1 (pixels)
=================  ===============================  ==============================================

A change-detection item is ``{"t1": sample, "t2": sample, "mask": (H, W)}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be read as declared; the message is one line naming the file."""


class BandMismatchError(DatasetError):
    """An image whose bands are not the ones expected (RGB where multispectral is expected, or
    the reverse, or a band missing): names the file, the bands found and the bands expected."""

    def __init__(self, path, found: Sequence[str], expected: Sequence[str], hint: str = ""):
        self.path, self.found, self.expected = str(path), list(found), list(expected)
        msg = (
            f"{path}: bands found {' '.join(self.found)} ({len(self.found)}), "
            f"expected {' '.join(self.expected)} ({len(self.expected)})"
        )
        super().__init__(msg + (f"; {hint}" if hint else ""))


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file (split files)."""
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]


class RemoteSensingDataset(Dataset):
    """Base of the public-dataset readers.

    Class attributes (the declaration; every subclass sets those that apply):
        name: registry name (``data=<name>``).
        task: ``classification``, ``multilabel``, ``segmentation``, ``change`` or
            ``detection``.
        sensors: modality -> sensor of :mod:`skysense.data.sensors` the model gets.
        file_bands: modality -> band names in the order the distributed files store them.
        resolution: modality -> ground sampling distance in metres (None: varies).
        crs: how the files are georeferenced and what the reader does with it.
        classes: class names, index = class.
        label_encoding: how labels are stored in the distribution (values, colours, files).
        split_files: split -> file (relative to root) that lists its items, as distributed.
        layout: the folder layout expected under ``root`` (for errors and the README).

    Args:
        root: the dataset's folder, as extracted from its archives.
        split: ``train``, ``val`` or ``test``.
        split_file: a text file of item names (one a line) that replaces the dataset's own
            split files for this split.
        modalities: the modalities to read (multi-modal datasets); default all declared.
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = ""
    sensors: ClassVar[dict[str, str]] = {}
    file_bands: ClassVar[dict[str, tuple[str, ...]]] = {}
    resolution: ClassVar[dict[str, float | None]] = {}
    crs: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    label_encoding: ClassVar[str] = ""
    split_files: ClassVar[dict[str, str]] = {}
    layout: ClassVar[str] = ""

    def __init__(
        self,
        root,
        split: str = "train",
        split_file=None,
        modalities: Sequence[str] | None = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.name}: root {self.root} is not a folder (expected layout: {self.layout})"
            )
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.split_file = Path(split_file) if split_file else None
        mods = list(modalities) if modalities else list(self.sensors)
        bad = [m for m in mods if m not in self.sensors]
        if bad:
            raise ValueError(f"{self.name}: modalities {bad} not among {list(self.sensors)}")
        self.modalities = mods
        self.items: list = []

    # ------------------------------------------------------------------ splits

    def split_names(self) -> list[str] | None:
        """Item names of this split from ``split_file`` or the dataset's own split file, or
        None when neither exists (the subclass then decides)."""
        if self.split_file is not None:
            if not self.split_file.is_file():
                raise FileNotFoundError(f"{self.name}: split_file {self.split_file} not found")
            return read_lines(self.split_file)
        rel = self.split_files.get(self.split)
        if rel and (self.root / rel).is_file():
            return read_lines(self.root / rel)
        return None

    def select(self, items: list, key, names: Sequence[str] | None) -> list:
        """The items whose ``key(item)`` is in ``names`` (all items when None); a name that
        matches no item is an error naming it."""
        if names is None:
            return items
        by = {key(it): it for it in items}
        missing = [n for n in names if n not in by]
        if missing:
            raise DatasetError(
                f"{self.name} {self.split} split: {len(missing)} listed items not under "
                f"{self.root} (first: {missing[0]!r})"
            )
        return [by[n] for n in names]

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def item_name(self, i: int) -> str:
        it = self.items[i]
        return str(it.get("name") if isinstance(it, dict) else it)

    def inputs(self) -> dict:
        """How a model is fed: ``modalities``, ``sensors`` and per modality ``bands``,
        ``mean``, ``std`` (the model's bands and statistics)."""
        from skysense.data.sensors import get_sensor

        sensors = {m: self.sensors[m] for m in self.modalities}
        out: dict = {"modalities": list(sensors), "sensors": sensors}
        for m, s in sensors.items():
            spec = get_sensor(s)
            out[m] = {
                "bands": list(spec.model_bands),
                "mean": list(spec.mean),
                "std": list(spec.std),
            }
        return out

    def describe(self) -> dict:
        """The declaration as a dict (for logs and the README table)."""
        return {
            "name": self.name,
            "task": self.task,
            "sensors": dict(self.sensors),
            "file_bands": {k: list(v) for k, v in self.file_bands.items()},
            "resolution": dict(self.resolution),
            "crs": self.crs,
            "classes": list(self.classes),
            "label_encoding": self.label_encoding,
            "split_files": dict(self.split_files),
            "layout": self.layout,
        }

    # ------------------------------------------------------------------ plot

    def plot(self, sample: dict, path, title: str | None = None) -> Path:
        """A PNG of ``sample`` (one item of this dataset): each modality's first step in
        colour (S2 true colour B4 B3 B2, S1 VV / VH / VV-VH, HR RGB), and the label (title),
        the mask, the change mask or the boxes. Returns the path written."""
        from skysense.data.datasets.plotting import plot_item

        return plot_item(sample, path, self.sensors, list(self.classes), self.task, title)


def one_hot(names: Sequence[str], classes: Sequence[str], where: str) -> torch.Tensor:
    """(K,) float32 multi-hot of ``names`` over ``classes``; an unknown name is an error."""
    idx = {c: k for k, c in enumerate(classes)}
    out = torch.zeros(len(classes), dtype=torch.float32)
    for n in names:
        if n not in idx:
            raise DatasetError(f"{where}: label {n!r} is not one of the {len(classes)} classes")
        out[idx[n]] = 1.0
    return out


def map_values(raw: np.ndarray, values: dict[int, int]) -> torch.Tensor:
    """(H, W) raw label values -> (H, W) int64 classes; values not in ``values`` are ignored."""
    out = np.full(raw.shape, IGNORE_INDEX, np.int64)
    for v, c in values.items():
        out[raw == v] = c
    return torch.from_numpy(out)

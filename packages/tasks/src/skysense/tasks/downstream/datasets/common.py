"""What the downstream data sets share: normalisation to the model's units, random crops and
flips applied alike to every input of a sample, and collation into contract batches.

A *sample* is a dict of tensors without the batch dimension, in the keys of the batch contract
(``hr`` (3, H, W), ``s2`` (T, 10, h, w), ``s2_doy`` (T,), ``s2_valid`` (T,), ``s1`` ...,
``latlon`` (2,), ``label``) plus the task's targets: ``mask`` (H, W) int64 for dense tasks
(255 = ignore), ``boxes`` (M, 4) / ``labels`` (M,) for detection. A change-detection sample is
``{"t1": sample, "t2": sample, "mask": (H, W)}``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from skysense.kernels.modalities import SERIES

IGNORE_INDEX = 255


def normalise(
    arr: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """(C, H, W) float with NaN for nodata -> ((C, H, W) float32 normalised with 0 on nodata,
    (H, W) bool valid = no band is NaN)."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != len(mean):
        raise ValueError(f"expected ({len(mean)}, H, W) bands, got {arr.shape}")
    valid = ~np.isnan(arr).any(0)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    x = np.nan_to_num((arr - m) / s, nan=0.0)
    return torch.from_numpy(x), torch.from_numpy(valid)


def day_of_year(date: dt.date | None) -> int:
    """1..366, or 0 when the date is unknown (the contract's "no date")."""
    return 0 if date is None else date.timetuple().tm_yday


def series_sample(
    modality: str,
    steps: Sequence[Tensor],
    doys: Sequence[int],
    pixel_valid: Sequence[Tensor] | None = None,
) -> dict:
    """One modality's series for a sample: ``{m: (T, C, h, w), m_doy: (T,), m_valid: (T,)}``."""
    out = {
        modality: torch.stack(list(steps)),
        f"{modality}_doy": torch.tensor(list(doys), dtype=torch.int64),
        f"{modality}_valid": torch.ones(len(steps), dtype=torch.bool),
    }
    if pixel_valid is not None:
        out[f"{modality}_pixel_valid"] = torch.stack(list(pixel_valid))
    return out


# ---------------------------------------------------------------- geometry shared by the inputs


def random_crop_box(rng: np.random.Generator, h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left of a ``size`` crop inside an ``h`` x ``w`` image (the image must be at least that)."""
    if h < size or w < size:
        raise ValueError(f"a {size} px crop does not fit in a {h} x {w} image")
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def apply_dihedral(x: Tensor, flip: bool, rot: int) -> Tensor:
    """Horizontal flip then ``rot`` quarter turns, on the last two dims."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, rot, (-2, -1)) if rot else x


def transform_sample(sample: dict, fn, spatial_keys: Sequence[str]) -> dict:
    """Apply ``fn`` to the spatial tensors of a (possibly nested) sample."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, dict):
            out[k] = transform_sample(v, fn, spatial_keys)
        elif k in spatial_keys:
            out[k] = fn(v)
        else:
            out[k] = v
    return out


SPATIAL_KEYS = ("hr", "s2", "s1", "hr_pixel_valid", "s2_pixel_valid", "s1_pixel_valid", "mask")


def random_dihedral(sample: dict, rng: np.random.Generator) -> dict:
    """The same random flip and quarter turn for every spatial input of the sample."""
    flip, rot = bool(rng.integers(2)), int(rng.integers(4))
    return transform_sample(sample, lambda x: apply_dihedral(x, flip, rot), SPATIAL_KEYS)


# ------------------------------------------------------------------------------- collation


def _pad_series(xs: list[Tensor], t: int, value=0) -> Tensor:
    out = []
    for x in xs:
        if x.shape[0] < t:
            pad = x.new_full((t - x.shape[0], *x.shape[1:]), value)
            x = torch.cat([x, pad])
        out.append(x)
    return torch.stack(out)


def collate(samples: Sequence[dict]) -> dict:
    """Samples -> a batch: tensors stacked; series padded to the longest (zeros, doy 0, valid
    False); ``boxes`` / ``labels`` / ``polygons`` of detection kept as lists; nested dicts (change pairs)
    collated recursively."""
    if not samples:
        raise ValueError("collate: no samples")
    keys = samples[0].keys()
    batch: dict = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], dict):
            batch[k] = collate(vals)
        elif k in ("boxes", "labels", "polygons"):  # detection: a varying number per image
            batch[k] = vals
        elif isinstance(vals[0], Tensor):
            m = k.split("_")[0]
            if m in SERIES and vals[0].ndim >= 1 and k != "latlon":
                t = max(v.shape[0] for v in vals)
                batch[k] = _pad_series(vals, t, False if vals[0].dtype == torch.bool else 0)
            else:
                batch[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            batch[k] = torch.tensor(vals)
        else:
            batch[k] = vals
    return batch


def to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch

"""Checks of the batch dict handed to ``SkySense.forward`` (contract: docs/contracts.md, "Batch").

Shape checks always run (they cost nothing and the shapes are static under compile/export).
Value checks (day-of-year range, latitude range) read the data, so they run in eager mode
only: compiled or exported programs skip them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from skysense.encoders.config import SkySenseConfig
from skysense.kernels.modalities import MODALITIES, SERIES

SERIES_BANDS = {"s2": "B2 B3 B4 B5 B6 B7 B8 B8A B11 B12", "s1": "VV VH"}


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def check_batch(batch: Mapping, cfg: SkySenseConfig) -> tuple[int, int, int]:
    """Validate ``batch`` for a model built from ``cfg``.

    Returns (B, h, w): the batch size and the fusion grid. Raises a ValueError that names the
    modality (key), the expected shape and the shape received.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"SkySense.forward takes the batch dict; got {type(batch).__name__}")
    present = [m for m in MODALITIES if m in batch]
    if not present:
        raise ValueError(
            "SkySense.forward: the batch has none of the modalities 'hr', 's2', 's1' "
            f"(keys: {sorted(batch)})"
        )
    missing = [m for m in present if m not in cfg.modalities]
    if missing:
        raise ValueError(
            f"SkySense.forward: the batch has {missing} but the model was built with "
            f"modalities={cfg.modalities}"
        )
    B = batch[present[0]].shape[0] if isinstance(batch[present[0]], torch.Tensor) else None
    grid: tuple[int, int] | None = None
    grid_from = ""

    if "hr" in batch:
        hr = batch["hr"]
        C = cfg.hr_in_chans
        if not isinstance(hr, torch.Tensor) or hr.dim() != 4 or hr.shape[1] != C:
            bands = " (bands R, G, B)" if C == 3 else ""
            raise ValueError(f"hr: expected (B, {C}, H, W) float{bands}; got {_shape(hr)}")
        if not hr.is_floating_point():
            raise ValueError(f"hr: expected a float tensor; got {hr.dtype}")
        H, W = hr.shape[2:]
        s = cfg.hr_stride
        if H % s or W % s:
            raise ValueError(
                f"hr: H and W must be multiples of {s} (Swin stage 4 stride); got {_shape(hr)}"
            )
        grid, grid_from = (H // s, W // s), f"hr {_shape(hr)} / {s} (Swin stage 4)"
        _check_steps(batch, "hr_doy", (B,), "hr", allow_missing=True)

    series_hw: tuple[int, int] | None = None
    for m in SERIES:
        if m not in batch:
            continue
        x = batch[m]
        C = cfg.s2_in_chans if m == "s2" else cfg.s1_in_chans
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[2] != C:
            raise ValueError(
                f"{m}: expected (B, T, {C}, hs, ws) float (bands {SERIES_BANDS[m]}); "
                f"got {_shape(x)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{m}: expected a float tensor; got {x.dtype}")
        if x.shape[0] != B:
            raise ValueError(
                f"{m}: batch size {x.shape[0]} differs from {present[0]}'s {B} ({_shape(x)})"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{m}: the series has no time step ({_shape(x)}); drop the key")
        hs, ws = x.shape[3:]
        p, u = cfg.vit_patch_size, cfg.grid_upscale
        if hs % p or ws % p:
            raise ValueError(
                f"{m}: hs and ws must be multiples of the ViT patch {p}; got {_shape(x)}"
            )
        if series_hw is not None and series_hw != (hs, ws):
            raise ValueError(
                f"{m}: tiles of {hs} x {ws} px do not match s2's {series_hw[0]} x "
                f"{series_hw[1]} px; S1 and S2 tiles must cover the same pixels"
            )
        series_hw = (hs, ws)
        g = (hs // p * u, ws // p * u)
        if grid is not None and g != grid:
            s = cfg.hr_stride
            raise ValueError(
                f"{m}: spatial size does not align with hr: {grid_from} gives a "
                f"{grid[0]} x {grid[1]} fusion grid, but {m} {_shape(x)} with ViT patch {p} "
                f"and upscale {u} gives {g[0]} x {g[1]}; expected {m} tiles of "
                f"{grid[0] * p // u} x {grid[1] * p // u} px (or hr of {g[0] * s} x "
                f"{g[1] * s} px)"
            )
        grid, grid_from = g, f"{m} {_shape(x)}"
        T = x.shape[1]
        _check_steps(batch, f"{m}_doy", (B, T), m, allow_missing=True)
        _check_steps(batch, f"{m}_valid", (B, T), m, allow_missing=True, boolean=True)

    if B is not None and "hr" in batch and batch["hr"].shape[0] != B:
        raise ValueError(f"hr: batch size {batch['hr'].shape[0]} differs from {B}")
    if "latlon" in batch:
        ll = batch["latlon"]
        if not isinstance(ll, torch.Tensor) or ll.shape != (B, 2) or not ll.is_floating_point():
            raise ValueError(
                f"latlon: expected (B, 2) = ({B}, 2) float (lat, lon degrees, NaN = unknown); "
                f"got {_shape(ll)}"
            )
        if _eager():
            lat = ll[:, 0]
            bad = ~torch.isnan(lat) & ((lat < -90) | (lat > 90))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"latlon: latitude must be in -90..90 degrees; sample {i} has {float(lat[i])}"
                )
    assert grid is not None
    return int(B), grid[0], grid[1]


def _check_steps(batch, key, shape, modality, allow_missing=False, boolean=False) -> None:
    if key not in batch:
        if allow_missing:
            return
        raise ValueError(f"{key}: missing; the batch has {modality}")
    t = batch[key]
    kind = "bool" if boolean else "int64"
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: expected {tuple(shape)} {kind} for {modality}; got {_shape(t)}")
    if boolean:
        if t.dtype != torch.bool:
            raise ValueError(f"{key}: expected bool; got {t.dtype}")
        return
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{key}: expected an integer day of year (int64); got {t.dtype}")
    if _eager():
        bad = (t < 0) | (t > 366)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{key}: day of year must be in 1..366 (0 = unknown or padded); "
                f"{modality} at index {idx} has {int(t[idx])}"
            )

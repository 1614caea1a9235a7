"""The batch contract: the names, shapes and dtypes of what the loaders yield.

One dict per batch (``docs/contracts.md``); a modality a batch lacks is absent. ``B`` batch,
``T`` time steps (padded to the longest of the global batch), ``H x W`` the HR tile,
``hs x ws`` the Sentinel tile.

=================== ================================== ==========================================
key                 shape, dtype                       meaning
=================== ================================== ==========================================
``hr``              (B, 3, H, W) float32               HR optical, normalised
``hr_doy``          (B,) int64                         day of year of the HR image (0 = unknown)
``hr_pixel_valid``  (B, H, W) bool                     False on nodata
``s2``              (B, T2, 10, hs, ws) float32        Sentinel-2 series, normalised
``s2_doy``          (B, T2) int64                      day of year 1..366 (0: padded, or date unknown)
``s2_valid``        (B, T2) bool                       False for padded or unusable steps
``s2_pixel_valid``  (B, T2, hs, ws) bool               False on nodata / cloud
``s1`` ...          (B, T1, 2, hs, ws) ...             Sentinel-1 VV, VH (dB), likewise
``latlon``          (B, 2) float32                     centre lat, lon in degrees; NaN unknown
``label``           (B,) int64 or (B, K) float32       class, or multi-hot labels
``sample_id``       (B,) int64                         row of the sample in its manifest
=================== ================================== ==========================================

Views mode yields ``{"view1": batch, "view2": batch}``; each view adds ``view_affine``
(B, 2, 3) float32 (view normalised coordinates -> the sample tile's, as
``torch.nn.functional.affine_grid`` with ``align_corners=False``) and ``s2_index`` /
``s1_index`` (B, T) int64 (step index in the sample's full series, -1 on padding).
"""

from __future__ import annotations

from typing import TypedDict

import torch

from skysense.kernels import modalities

HR = "hr"
S2 = "s2"
S1 = "s1"
MODALITIES, SERIES = modalities.MODALITIES, modalities.SERIES  # (HR, S2, S1), (S2, S1)
HR_DOY = "hr_doy"
HR_PIXEL_VALID = "hr_pixel_valid"
S2_DOY, S2_VALID, S2_PIXEL_VALID, S2_INDEX = "s2_doy", "s2_valid", "s2_pixel_valid", "s2_index"
S1_DOY, S1_VALID, S1_PIXEL_VALID, S1_INDEX = "s1_doy", "s1_valid", "s1_pixel_valid", "s1_index"
LATLON = "latlon"
LABEL = "label"
SAMPLE_ID = "sample_id"
VIEW_AFFINE = "view_affine"
VIEW1, VIEW2 = "view1", "view2"

N_CHANNELS = {m: modalities.MODALITY[m].channels for m in MODALITIES}  # HR 3, S2 10, S1 2


def doy_key(m: str) -> str:
    return f"{m}_doy"


def valid_key(m: str) -> str:
    return f"{m}_valid"


def pixel_valid_key(m: str) -> str:
    return f"{m}_pixel_valid"


def index_key(m: str) -> str:
    return f"{m}_index"


class Batch(TypedDict, total=False):
    """One batch (every key optional: a modality the batch lacks is absent)."""

    hr: torch.Tensor
    hr_doy: torch.Tensor
    hr_pixel_valid: torch.Tensor
    s2: torch.Tensor
    s2_doy: torch.Tensor
    s2_valid: torch.Tensor
    s2_pixel_valid: torch.Tensor
    s2_index: torch.Tensor
    s1: torch.Tensor
    s1_doy: torch.Tensor
    s1_valid: torch.Tensor
    s1_pixel_valid: torch.Tensor
    s1_index: torch.Tensor
    latlon: torch.Tensor
    label: torch.Tensor
    sample_id: torch.Tensor
    view_affine: torch.Tensor


class BatchError(ValueError):
    """A batch that breaks the contract; the message names the key and what is wrong."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise BatchError(f"batch[{key!r}]: {msg}")


def _tensor(batch, key, dtype, ndim) -> torch.Tensor:
    x = batch[key]
    _check(isinstance(x, torch.Tensor), key, f"expected a torch.Tensor, got {type(x).__name__}")
    _check(x.dtype == dtype, key, f"dtype {x.dtype}, expected {dtype}")
    _check(x.ndim == ndim, key, f"shape {tuple(x.shape)} has {x.ndim} dims, expected {ndim}")
    return x


def validate_batch(batch: dict, *, views: bool | None = None) -> None:
    """Raise :class:`BatchError` naming the key and shape when ``batch`` breaks the contract.

    A views batch (``{"view1": ..., "view2": ...}``) is checked view by view, plus the
    agreement of the two views (same samples, same order). ``views=True`` requires a views
    batch, ``False`` a plain one, ``None`` takes either.
    """
    if not isinstance(batch, dict):
        raise BatchError(f"a batch is a dict, got {type(batch).__name__}")
    is_views = VIEW1 in batch or VIEW2 in batch
    if views is True and not is_views:
        raise BatchError("expected a views batch with keys 'view1' and 'view2'")
    if views is False and is_views:
        raise BatchError("expected a plain batch, got a views batch")
    if is_views:
        for v in (VIEW1, VIEW2):
            if v not in batch:
                raise BatchError(f"views batch lacks {v!r}")
            try:
                _validate_one(batch[v], view=True)
            except BatchError as e:
                raise BatchError(f"{v}: {e}") from None
        b1, b2 = batch[VIEW1], batch[VIEW2]
        if SAMPLE_ID in b1 and SAMPLE_ID in b2 and not torch.equal(b1[SAMPLE_ID], b2[SAMPLE_ID]):
            raise BatchError("view1 and view2 hold different samples (sample_id differs)")
        return
    _validate_one(batch, view=False)


def _validate_one(batch: dict, view: bool) -> None:
    present = [m for m in MODALITIES if m in batch]
    if not present:
        raise BatchError(f"batch has none of the modalities {MODALITIES}; keys: {sorted(batch)}")
    B = batch[present[0]].shape[0] if isinstance(batch[present[0]], torch.Tensor) else None
    if HR in batch:
        x = _tensor(batch, HR, torch.float32, 4)
        _check(x.shape[:2] == (B, 3), HR, f"shape {tuple(x.shape)}, expected (B={B}, 3, H, W)")
        H, W = x.shape[2:]
        if HR_DOY in batch:
            d = _tensor(batch, HR_DOY, torch.int64, 1)
            _check(d.shape == (B,), HR_DOY, f"shape {tuple(d.shape)}, expected ({B},)")
        if HR_PIXEL_VALID in batch:
            pv = _tensor(batch, HR_PIXEL_VALID, torch.bool, 3)
            _check(
                tuple(pv.shape) == (B, H, W),
                HR_PIXEL_VALID,
                f"shape {tuple(pv.shape)}, expected ({B}, {H}, {W})",
            )
    for m in SERIES:
        if m not in batch:
            for k in (doy_key(m), valid_key(m), pixel_valid_key(m), index_key(m)):
                _check(k not in batch, k, f"present but modality {m!r} is absent")
            continue
        C = N_CHANNELS[m]
        x = _tensor(batch, m, torch.float32, 5)
        _check(
            x.shape[0] == B and x.shape[2] == C,
            m,
            f"shape {tuple(x.shape)}, expected (B={B}, T, {C}, hs, ws)",
        )
        T, hs, ws = x.shape[1], x.shape[3], x.shape[4]
        for k, dtype in ((doy_key(m), torch.int64), (valid_key(m), torch.bool)):
            _check(k in batch, k, f"missing (required with {m!r})")
            t = _tensor(batch, k, dtype, 2)
            _check(tuple(t.shape) == (B, T), k, f"shape {tuple(t.shape)}, expected ({B}, {T})")
        doy = batch[doy_key(m)]
        # 0 on a valid step: an image of unknown date (its DTPE row is zero in the encoder).
        _check(bool(((doy >= 0) & (doy <= 366)).all()), doy_key(m), "day of year outside 0..366")
        if pixel_valid_key(m) in batch:
            pv = _tensor(batch, pixel_valid_key(m), torch.bool, 4)
            _check(
                tuple(pv.shape) == (B, T, hs, ws),
                pixel_valid_key(m),
                f"shape {tuple(pv.shape)}, expected ({B}, {T}, {hs}, {ws})",
            )
        if view:
            _check(index_key(m) in batch, index_key(m), f"missing in a view (required with {m!r})")
        if index_key(m) in batch:
            ix = _tensor(batch, index_key(m), torch.int64, 2)
            _check(
                tuple(ix.shape) == (B, T),
                index_key(m),
                f"shape {tuple(ix.shape)}, expected ({B}, {T})",
            )
    if LATLON in batch:
        ll = _tensor(batch, LATLON, torch.float32, 2)
        _check(tuple(ll.shape) == (B, 2), LATLON, f"shape {tuple(ll.shape)}, expected ({B}, 2)")
    if LABEL in batch:
        lab = batch[LABEL]
        _check(isinstance(lab, torch.Tensor), LABEL, "expected a tensor")
        ok = (lab.dtype == torch.int64 and lab.ndim == 1) or (
            lab.dtype == torch.float32 and lab.ndim == 2
        )
        _check(ok, LABEL, f"{lab.dtype} {tuple(lab.shape)}: expected (B,) int64 or (B, K) float32")
        _check(lab.shape[0] == B, LABEL, f"batch size {lab.shape[0]}, expected {B}")
    if SAMPLE_ID in batch:
        sid = _tensor(batch, SAMPLE_ID, torch.int64, 1)
        _check(sid.shape == (B,), SAMPLE_ID, f"shape {tuple(sid.shape)}, expected ({B},)")
    if view:
        _check(VIEW_AFFINE in batch, VIEW_AFFINE, "missing in a view")
    if VIEW_AFFINE in batch:
        a = _tensor(batch, VIEW_AFFINE, torch.float32, 3)
        _check(
            tuple(a.shape) == (B, 2, 3),
            VIEW_AFFINE,
            f"shape {tuple(a.shape)}, expected ({B}, 2, 3)",
        )

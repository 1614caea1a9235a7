"""Data-path CPU kernels (the C++ extension lands with the kernels issue; numpy reference now)."""

from __future__ import annotations

import numpy as np

from skysense.kernels import dispatch


def normalize_crop_flip_reference(
    src, mean, std, *, layout="TCHW", crop=None, hflip=False, vflip=False, rot90=0, nodata=None
):
    """The numpy sequence the C++ kernel replaces.

    src: (T, C, H, W) if layout == "TCHW" or (T, H, W, C) if "THWC"; uint16, int16, uint8 or
    float32. crop: (top, left, height, width) in the source grid, or None. Flips then rot90
    (k quarter turns counter-clockwise, as ``np.rot90`` on (H, W)) are applied after cropping.
    Returns (out float32 (T, C, h, w) = (x - mean) / std with invalid pixels set to 0,
    valid bool (T, h, w): no band equals ``nodata`` and every band is finite).
    """
    x = np.asarray(src)
    if layout == "THWC":
        x = x.transpose(0, 3, 1, 2)
    if crop is not None:
        top, left, h, w = crop
        x = x[:, :, top : top + h, left : left + w]
    valid = np.ones((x.shape[0],) + x.shape[2:], dtype=bool)
    if nodata is not None:
        valid &= ~(x == nodata).any(axis=1)
    xf = x.astype(np.float32)
    valid &= np.isfinite(xf).all(axis=1)
    mean = np.asarray(mean, np.float32)[None, :, None, None]
    std = np.asarray(std, np.float32)[None, :, None, None]
    out = (xf - mean) / std
    out = np.where(valid[:, None], out, np.float32(0))
    if hflip:
        out, valid = out[..., ::-1], valid[..., ::-1]
    if vflip:
        out, valid = out[..., ::-1, :], valid[..., ::-1, :]
    if rot90 % 4:
        out = np.rot90(out, rot90, axes=(2, 3))
        valid = np.rot90(valid, rot90, axes=(1, 2))
    return np.ascontiguousarray(out, dtype=np.float32), np.ascontiguousarray(valid)


def normalize_crop_flip(
    src, mean, std, *, layout="TCHW", crop=None, hflip=False, vflip=False, rot90=0, nodata=None
):
    """Band stack -> normalised float32 with crop, flips, rotation and a nodata mask, one pass.

    Same contract as :func:`normalize_crop_flip_reference`.
    """
    dispatch.record("normalize_crop_flip", "numpy")
    return normalize_crop_flip_reference(
        src,
        mean,
        std,
        layout=layout,
        crop=crop,
        hflip=hflip,
        vflip=vflip,
        rot90=rot90,
        nodata=nodata,
    )

"""Data-path CPU kernels: band stack -> normalised float32 with crop, flips, quarter turns and a
nodata mask, in one multi-threaded C++ pass (``skysense.kernels._C``), with the numpy sequence it
replaces beside it as the reference.

Backends: ``cpp`` (the extension, compiled at install) and ``numpy`` (the reference). Where the
extension is missing the op falls back to numpy and logs a warning once.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

from skysense.kernels import dispatch

log = logging.getLogger(__name__)

OP = "normalize_crop_flip"
_DTYPES = (np.uint8, np.int16, np.uint16, np.float32)

try:  # the compiled extension; absent when the distribution was installed without a compiler
    from skysense.kernels import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    _C = None
    _C_ERROR = str(e)
else:
    _C_ERROR = ""

_warned = False


def cpp_available() -> bool:
    """True when the C++ extension ``skysense.kernels._C`` was built and imports."""
    return _C is not None and hasattr(_C, "normalize_crop_flip")


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


def output_map(h: int, w: int, hflip: bool, vflip: bool, rot90: int) -> tuple[int, ...]:
    """Integer affine map from an output pixel to the cropped source pixel.

    For a cropped source of h x w pixels, hflip, then vflip, then ``np.rot90(., rot90)``, returns
    (h_out, w_out, oy, yi, yj, ox, xi, xj) such that output (i, j) reads source
    (oy + yi i + yj j, ox + xi i + xj j).
    """
    # (y, x) = (a[0] + a[1] i + a[2] j, a[3] + a[4] i + a[5] j), composed one step at a time on
    # the current array's shape (H, W).
    a = [0, 1, 0, 0, 0, 1]
    H, W = h, w

    def sub(
        ci, cj
    ):  # substitute (i, j) -> (ci, cj), each an affine (c0, c_i, c_j) of the new (i, j)
        out = []
        for base in (0, 3):
            c0, c1, c2 = a[base], a[base + 1], a[base + 2]
            out += [
                c0 + c1 * ci[0] + c2 * cj[0],
                c1 * ci[1] + c2 * cj[1],
                c1 * ci[2] + c2 * cj[2],
            ]
        return out

    if hflip:  # new[i, j] = old[i, W-1-j]
        a = sub((0, 1, 0), (W - 1, 0, -1))
    if vflip:  # new[i, j] = old[H-1-i, j]
        a = sub((H - 1, -1, 0), (0, 0, 1))
    k = rot90 % 4
    if k == 1:  # new[i, j] = old[j, W-1-i], shape (W, H)
        a = sub((0, 0, 1), (W - 1, -1, 0))
        H, W = W, H
    elif k == 2:  # new[i, j] = old[H-1-i, W-1-j]
        a = sub((H - 1, -1, 0), (W - 1, 0, -1))
    elif k == 3:  # new[i, j] = old[H-1-j, i], shape (W, H)
        a = sub((H - 1, 0, -1), (0, 1, 0))
        H, W = W, H
    return (H, W, *a)


def _nodata_for(dtype: np.dtype, nodata) -> tuple[bool, float]:
    """(has_nodata, value) as numpy's ``x == nodata`` would compare it against ``dtype``."""
    if nodata is None:
        return False, 0.0
    if dtype == np.float32:
        v = np.float32(nodata)  # numpy compares a Python float as float32 against float32 data
        return (not np.isnan(v)), float(v)
    if isinstance(nodata, numbers.Real) and not float(nodata).is_integer():
        return False, 0.0  # an integer band never equals a non-integral value
    info = np.iinfo(dtype)
    v = int(nodata)
    if v < info.min or v > info.max:
        return False, 0.0
    return True, float(v)


def _check(x: np.ndarray, mean, std, layout, crop):
    if x.ndim != 4:
        raise ValueError(
            f"normalize_crop_flip: src must be 4-d ({layout}), got shape {tuple(x.shape)}"
        )
    if layout not in ("TCHW", "THWC"):
        raise ValueError(f"normalize_crop_flip: layout must be 'TCHW' or 'THWC', got {layout!r}")
    if layout == "TCHW":
        _, c, h, w = x.shape
    else:
        _, h, w, c = x.shape
    if np.size(mean) != c or np.size(std) != c:
        raise ValueError(
            f"normalize_crop_flip: {c} bands in src {tuple(x.shape)} ({layout}) but mean has "
            f"{np.size(mean)} and std {np.size(std)} values"
        )
    if crop is not None:
        top, left, ch, cw = (int(v) for v in crop)
        if top < 0 or left < 0 or ch <= 0 or cw <= 0 or top + ch > h or left + cw > w:
            raise ValueError(
                f"normalize_crop_flip: crop (top={top}, left={left}, height={ch}, width={cw}) "
                f"does not fit in the {h}x{w} source"
            )
    return h, w


def normalize_crop_flip(
    src,
    mean,
    std,
    *,
    layout="TCHW",
    crop=None,
    hflip=False,
    vflip=False,
    rot90=0,
    nodata=None,
    num_threads=None,
):
    """Band stack -> normalised float32 with crop, flips, rotation and a nodata mask, one pass.

    Args:
        src: numpy (T, C, H, W) for ``layout="TCHW"`` or (T, H, W, C) for ``"THWC"`` (the
            pixel-interleaved shard layout); uint8, int16, uint16 or float32.
        mean, std: (C,) per-band statistics (cast to float32).
        crop: (top, left, height, width) in the source grid, or None for the whole tile.
        hflip, vflip, rot90: applied after the crop in that order (rot90 = k quarter turns
            counter-clockwise, as ``np.rot90`` on (H, W)).
        nodata: pixel value marking missing data (compared as numpy compares it), or None.
        num_threads: OpenMP threads of the cpp backend; None = one thread below ~2M output
            values (a fork/join costs more than such a tile on a busy machine, e.g. inside
            data-loader workers), else OpenMP's maximum (``OMP_NUM_THREADS``).

    Returns:
        (out, valid): float32 (T, C, h, w) with ``(x - mean) / std`` and 0 on invalid pixels,
        bool (T, h, w), False where a band equals ``nodata`` or is not finite. Bit-identical to
        :func:`normalize_crop_flip_reference`. ``last_backend("normalize_crop_flip")`` is "cpp"
        or "numpy".
    """
    global _warned
    x = np.asarray(src)
    h, w = _check(x, mean, std, layout, crop)
    forced = dispatch.forced_backend(OP)
    backend = forced or ("cpp" if cpp_available() and x.dtype in _DTYPES else "numpy")
    if backend not in ("cpp", "numpy"):
        raise ValueError(f"normalize_crop_flip: unknown backend {backend!r} (cpp, numpy)")
    if backend == "cpp" and not cpp_available():  # only a forced "cpp" gets here
        raise RuntimeError(
            f"normalize_crop_flip: backend 'cpp' forced but skysense.kernels._C is missing "
            f"({_C_ERROR or 'built without normalize_crop_flip'}); reinstall skysense-kernels"
        )
    if backend == "cpp" and x.dtype not in _DTYPES:
        raise TypeError(
            f"normalize_crop_flip: the cpp backend takes uint8, int16, uint16 or float32, "
            f"got {x.dtype}"
        )
    if backend == "numpy" and not forced and not cpp_available() and not _warned:
        log.warning(
            "skysense.kernels._C is not available (%s): normalize_crop_flip runs the slower "
            "numpy sequence",
            _C_ERROR or "extension without this kernel",
        )
        _warned = True
    if backend == "numpy":
        dispatch.record(OP, "numpy")
        return normalize_crop_flip_reference(
            x,
            mean,
            std,
            layout=layout,
            crop=crop,
            hflip=hflip,
            vflip=vflip,
            rot90=rot90,
            nodata=nodata,
        )
    crop_t = (0, 0, h, w) if crop is None else tuple(int(v) for v in crop)
    amap = output_map(crop_t[2], crop_t[3], bool(hflip), bool(vflip), int(rot90))
    has_nd, nd = _nodata_for(x.dtype, nodata)
    out, valid = _C.normalize_crop_flip(
        np.ascontiguousarray(x),
        np.ascontiguousarray(np.asarray(mean, np.float32).reshape(-1)),
        np.ascontiguousarray(np.asarray(std, np.float32).reshape(-1)),
        layout,
        list(crop_t),
        list(amap),
        has_nd,
        nd,
        0 if num_threads is None else max(1, int(num_threads)),
    )
    dispatch.record(OP, "cpp")
    return out, valid

"""GeoTIFF label masks aligned to their image.

A label mask is a one-band integer raster of class values on the image's pixels. Three cases:

- the mask is georeferenced on the image's grid (same CRS, transform, shape): read as is;
- the mask is georeferenced on another grid that overlaps the image: resampled onto the image's
  grid with nearest neighbour (a class value is never interpolated), pixels outside it ignored;
- the mask carries no georeferencing (OSCD's change masks): it must have the image's shape, and
  is taken pixel for pixel.

Values are mapped to training classes with ``values`` (raw value -> class index); every raw
value not in it, and the mask's nodata, become ``IGNORE_INDEX``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import Resampling, reproject

from skysense.tasks.downstream.datasets.common import IGNORE_INDEX


def _georeferenced(ds) -> bool:
    return ds.crs is not None and ds.transform != Affine.identity()


def read_label_mask(
    path: str | Path,
    image_profile: Mapping,
    values: Mapping[int, int] | None = None,
) -> np.ndarray:
    """The mask at ``path`` on the grid of ``image_profile`` (``crs``, ``transform``,
    ``height``, ``width``, as :mod:`skysense.data.io` returns).

    Args:
        values: raw value -> class index; None keeps raw values (nodata still ignored).
    Returns:
        (H, W) int64 class indices, ``IGNORE_INDEX`` where unknown.
    Raises:
        ValueError naming the file when it is not one band, not an integer raster, has another
        shape without georeferencing, or does not overlap the image.
    """
    path = Path(path)
    h, w = int(image_profile["height"]), int(image_profile["width"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        ds = rasterio.open(path)
    with ds:
        if ds.count != 1:
            raise ValueError(f"label mask {path}: {ds.count} bands, expected 1")
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise ValueError(f"label mask {path}: dtype {ds.dtypes[0]}, expected integer classes")
        nodata = ds.nodata
        if not _georeferenced(ds) or image_profile.get("crs") is None:
            if (ds.height, ds.width) != (h, w):
                raise ValueError(
                    f"label mask {path} has no georeferencing and {ds.height} x {ds.width} "
                    f"pixels, but the image has {h} x {w}: it cannot be aligned"
                )
            raw = ds.read(1).astype(np.int64)
            outside = np.zeros((h, w), bool)
        elif (
            ds.crs == image_profile["crs"]
            and (ds.height, ds.width) == (h, w)
            and np.allclose(tuple(ds.transform)[:6], tuple(image_profile["transform"])[:6])
        ):
            raw = ds.read(1).astype(np.int64)
            outside = np.zeros((h, w), bool)
        else:
            fill = -1
            dst = np.full((h, w), fill, np.int64)
            src = ds.read(1).astype(np.int64)
            reproject(
                src,
                dst,
                src_transform=ds.transform,
                src_crs=ds.crs,
                src_nodata=nodata,
                dst_transform=image_profile["transform"],
                dst_crs=image_profile["crs"],
                dst_nodata=fill,
                resampling=Resampling.nearest,
            )
            outside = dst == fill
            if outside.all():
                raise ValueError(f"label mask {path} does not overlap the image")
            raw = dst
    out = np.full((h, w), IGNORE_INDEX, np.int64)
    if values is None:
        keep = ~outside
        out[keep] = raw[keep]
    else:
        for v, c in values.items():
            out[(raw == int(v)) & ~outside] = int(c)
    if nodata is not None:
        out[raw == int(nodata)] = IGNORE_INDEX
    return out

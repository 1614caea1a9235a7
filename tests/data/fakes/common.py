"""Writers shared by the fakes: GeoTIFFs with a given profile, PNG / JPEG images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning


def write_tif(
    path: Path,
    arr: np.ndarray,
    crs=None,
    transform: Affine | None = None,
    nodata=None,
    descriptions=None,
) -> Path:
    """(C, H, W) or (H, W) -> a deflate-compressed GeoTIFF (no georeference when crs is None)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"crs": crs, "transform": transform} if crs is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=arr.shape[1],
            width=arr.shape[2],
            count=arr.shape[0],
            dtype=arr.dtype,
            nodata=nodata,
            compress="deflate",
            **kw,
        ) as ds:
            ds.write(arr)
            for i, d in enumerate(descriptions or [], 1):
                ds.set_band_description(i, d)
    return path


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """(H, W, 3) or (H, W) uint8 -> PNG / JPEG by suffix."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path, quality=90)
    return path


def smooth_rgb(rng: np.random.Generator, size: int, level: int) -> np.ndarray:
    """(size, size, 3) uint8: a gradient around ``level`` with a little noise (compresses)."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = level + 20 * np.sin(yy / 7.0) + 20 * np.cos(xx / 5.0)
    img = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], -1)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)

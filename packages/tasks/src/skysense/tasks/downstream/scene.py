"""Windowed reading of a scene of any size: one modality's GeoTIFF stack or folder of per-band
files, read window by window onto a reference grid.

A :class:`SceneReader` keeps its files open and reads only the pixels under the window asked
for (:func:`skysense.data.io.read_band` warps a band onto any grid, reading just the source
pixels under it), so memory follows the window, not the scene. Bands come back in the model's
order and units, NaN where there is no data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skysense.data.geo import Grid


class SceneReader:
    """One modality of a scene.

    Args:
        path: a multi-band GeoTIFF, or a folder of one GeoTIFF per band (Sentinel-2 as
            distributed).
        sensor: the sensor registry name (``hr_rgb``, ``s2_l1c``, ``s2_l2a``, ``s1_grd_db``...).
        bands: the bands to read, in the model's order (default: the sensor's model bands).
    """

    def __init__(self, path: str | Path, sensor: str, bands: Sequence[str] | None = None):
        from skysense.data import io
        from skysense.data.sensors import get_sensor

        self.path = Path(path)
        self.spec = get_sensor(sensor)
        self.bands = list(bands or self.spec.model_bands)
        self._handles = []
        self._sources: list[tuple[object, int]] = []  # (dataset, 1-based band) per model band
        if self.path.is_dir():
            files = io.find_band_files(self.path, self.spec, self.bands)
            for f in files.values():
                ds = io.open_raster(f)
                io.check_dtype(ds, self.spec)
                self._handles.append(ds)
                self._sources.append((ds, 1))
            # The grid of the finest band (B2 at 10 m for Sentinel-2): its CRS and pixels.
            finest = min(self._handles, key=lambda d: abs(d.transform.a))
            self.grid = Grid.of(finest)
            first = next(iter(files.values()))
            self.nodata = finest.nodata
        else:
            ds = io.open_raster(self.path)
            io.check_dtype(ds, self.spec)
            self._handles.append(ds)
            names = io.stack_band_names(ds, self.spec)
            for b in self.bands:
                cb = self.spec.canonical_band(b)
                if cb not in names:
                    raise ValueError(f"{self.path}: band {b} not in the stack ({names})")
                self._sources.append((ds, names.index(cb) + 1))
            self.grid = Grid.of(ds)
            first = self.path
            self.nodata = ds.nodata
        self.date = io.read_date(first, tags=self._handles[0].tags())

    def read(self, grid: Grid) -> np.ndarray:
        """(C, grid.height, grid.width) float32 on ``grid``, NaN where there is no data
        (nodata, or outside the scene)."""
        from skysense.data import io

        return np.stack([io.read_band(ds, b, self.spec, grid) for ds, b in self._sources])

    def close(self) -> None:
        for ds in self._handles:
            ds.close()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

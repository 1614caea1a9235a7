"""Grids and coordinate reference systems: the footprint a sample's sensors are aligned to.

A :class:`Grid` is a north-up raster grid: a CRS, an affine transform and a shape. Ingest picks
one grid per sample (Sentinel grid at 10 m; the HR grid is the same footprint at a finer pixel)
and warps every sensor onto it with :func:`warp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform, transform_bounds

WGS84 = CRS.from_epsg(4326)
_WEB_MERCATOR = {3857, 900913, 3785, 102100}


@dataclass(frozen=True)
class Grid:
    """A north-up grid: ``crs``, ``transform`` (pixel -> CRS coordinates), ``height`` x ``width``."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units, both positive."""
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return min(left, right), min(bottom, top), max(left, right), max(bottom, top)

    @classmethod
    def from_bounds(cls, bounds, crs, res: float, *, origin=None) -> Grid:
        """The grid of pixel size ``res`` covering ``bounds`` (left, bottom, right, top).

        Pixel edges sit on ``origin`` (x, y) plus whole pixels when given (to keep a sensor's
        native pixels where they are), else on multiples of ``res``. A pixel is kept when at
        least half of it lies inside the bounds.
        """
        left, bottom, right, top = bounds
        ox, oy = origin if origin is not None else (0.0, 0.0)
        x0 = ox + math.floor((left - ox) / res + 0.5) * res
        y0 = oy + math.ceil((top - oy) / res - 0.5) * res
        width = int(math.floor((right - x0) / res + 0.5))
        height = int(math.floor((y0 - bottom) / res + 0.5))
        return cls(CRS.from_user_input(crs), Affine(res, 0, x0, 0, -res, y0), height, width)

    @classmethod
    def of(cls, dataset) -> Grid:
        """The grid of an open rasterio dataset."""
        return cls(dataset.crs, dataset.transform, dataset.height, dataset.width)

    def window(self, top: int, left: int, height: int, width: int) -> Grid:
        """The sub-grid of ``height`` x ``width`` pixels starting at pixel (``top``, ``left``)."""
        return Grid(self.crs, self.transform @ Affine.translation(left, top), height, width)

    def scaled(self, factor: int) -> Grid:
        """The same footprint with pixels ``factor`` times smaller (``factor`` x more of them)."""
        return Grid(
            self.crs,
            self.transform @ Affine.scale(1.0 / factor),
            self.height * factor,
            self.width * factor,
        )

    def centre_latlon(self) -> tuple[float, float]:
        """Latitude and longitude (degrees, WGS 84) of the grid's centre."""
        x, y = self.transform @ (self.width / 2.0, self.height / 2.0)
        return point_latlon(x, y, self.crs)

    def same_as(self, other: Grid, tol: float = 1e-6) -> bool:
        """True when both grids have the same CRS, shape and pixel placement."""
        return (
            self.shape == other.shape
            and self.crs == other.crs
            and all(
                abs(a - b) <= tol * max(1.0, abs(a))
                for a, b in zip(self.transform[:6], other.transform[:6])
            )
        )


def point_latlon(x: float, y: float, crs) -> tuple[float, float]:
    """(lat, lon) in degrees of point (x, y) in ``crs``."""
    crs = CRS.from_user_input(crs)
    if crs == WGS84:
        return float(y), float(x)
    xs, ys = transform(crs, WGS84, [x], [y])
    return float(ys[0]), float(xs[0])


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS 84 / UTM zone CRS (EPSG:326xx north, 327xx south) that contains (lon, lat)."""
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"(lon, lat) = ({lon}, {lat}) is not a WGS 84 position")
    zone = min(60, int((lon + 180.0) // 6.0) + 1)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def is_metric_projected(crs) -> bool:
    """True for a projected CRS in metres whose pixels are true ground metres near the centre.

    Web Mercator is projected in metres, but its scale grows as 1 / cos(latitude), so a pixel
    of "10 m" there is not 10 m on the ground: it does not count.
    """
    crs = CRS.from_user_input(crs)
    if not crs.is_projected or crs.to_epsg() in _WEB_MERCATOR:
        return False
    units = (crs.linear_units or "").lower()
    return units in ("metre", "meter", "m", "metres", "meters")


def choose_crs(crs, bounds, requested: str | None = "auto") -> CRS:
    """The CRS a sample is aligned in.

    ``requested`` = "auto": ``crs`` itself when it is metric and projected (UTM as distributed),
    else the UTM zone of the footprint's centre (geographic or Web Mercator inputs); "utm": the
    UTM zone always; anything else is parsed as a CRS ("EPSG:32631").
    """
    crs = CRS.from_user_input(crs)
    if requested in (None, "auto") and is_metric_projected(crs):
        return crs
    if requested not in (None, "auto", "utm"):
        return CRS.from_user_input(requested)
    lon0, lat0, lon1, lat1 = transform_bounds(crs, WGS84, *bounds)
    return utm_crs((lon0 + lon1) / 2.0, (lat0 + lat1) / 2.0)


def bounds_in(bounds, src_crs, dst_crs) -> tuple[float, float, float, float]:
    """``bounds`` of ``src_crs`` as (left, bottom, right, top) in ``dst_crs`` (densified edges)."""
    if CRS.from_user_input(src_crs) == CRS.from_user_input(dst_crs):
        return tuple(bounds)
    return transform_bounds(src_crs, dst_crs, *bounds, densify_pts=21)


def intersect(a, b):
    """Intersection of two (left, bottom, right, top) boxes, or None when they do not overlap."""
    left, bottom = max(a[0], b[0]), max(a[1], b[1])
    right, top = min(a[2], b[2]), min(a[3], b[3])
    if right <= left or top <= bottom:
        return None
    return left, bottom, right, top


def area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


RESAMPLING = {
    "nearest": Resampling.nearest,
    "bilinear": Resampling.bilinear,
    "cubic": Resampling.cubic,
    "average": Resampling.average,
    "mode": Resampling.mode,
}


def resampling_method(name: str) -> Resampling:
    try:
        return RESAMPLING[name]
    except KeyError:
        raise ValueError(
            f"resampling {name!r} unknown; choose one of {sorted(RESAMPLING)}"
        ) from None


def warp(
    dataset: rasterio.io.DatasetReader,
    band: int,
    grid: Grid,
    *,
    resampling: str = "bilinear",
    src_nodata: float | None = None,
) -> np.ndarray:
    """Band ``band`` (1-based) of an open dataset, warped onto ``grid``, as float32.

    Pixels without data (outside the source, or ``src_nodata`` in it) come back NaN. Where the
    source already lies on ``grid`` it is read directly (no resampling, so values are exact).
    Only the part of the source under ``grid`` is read, so memory follows the grid, not the file.
    """
    src_grid = Grid.of(dataset)
    if src_grid.crs is None:
        raise ValueError(f"{dataset.name}: no CRS")
    if src_grid.crs == grid.crs and _aligned(src_grid, grid):
        return _read_aligned(dataset, band, src_grid, grid, src_nodata)
    out = np.full(grid.shape, np.nan, dtype=np.float32)
    xscale, yscale = _scales(src_grid, grid)
    reproject(
        source=rasterio.band(dataset, band),
        destination=out,
        src_nodata=src_nodata,
        dst_transform=grid.transform,
        dst_crs=grid.crs,
        dst_nodata=np.nan,
        resampling=resampling_method(resampling),
        # GDAL sizes its resampling kernel from each chunk's own source/destination ratio, so
        # the same pixel would differ between a whole-place warp and a one-tile warp; a fixed
        # ratio (of the whole file) makes every pixel independent of the window asked for.
        XSCALE=repr(xscale),
        YSCALE=repr(yscale),
    )
    return out


def _scales(src: Grid, dst: Grid) -> tuple[float, float]:
    """Destination pixels per source pixel along x and y, over the whole source."""
    b = bounds_in(src.bounds, src.crs, dst.crs)
    return (b[2] - b[0]) / dst.res[0] / src.width, (b[3] - b[1]) / dst.res[1] / src.height


def _aligned(src: Grid, dst: Grid) -> bool:
    """True when ``dst``'s pixels are whole pixels of ``src`` (same size, offsets whole)."""
    a, b = src.transform, dst.transform
    if abs(a.a - b.a) > 1e-9 * abs(a.a) or abs(a.e - b.e) > 1e-9 * abs(a.e) or a.b or a.d:
        return False
    col = (b.c - a.c) / a.a
    row = (b.f - a.f) / a.e
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6


def _read_aligned(dataset, band, src: Grid, dst: Grid, src_nodata) -> np.ndarray:
    col = round((dst.transform.c - src.transform.c) / src.transform.a)
    row = round((dst.transform.f - src.transform.f) / src.transform.e)
    out = np.full(dst.shape, np.nan, dtype=np.float32)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + dst.height, src.height), min(col + dst.width, src.width)
    if r1 <= r0 or c1 <= c0:
        return out
    win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
    data = dataset.read(band, window=win).astype(np.float32)
    if src_nodata is not None:
        if np.isnan(src_nodata):
            pass
        else:
            data[data == np.float32(src_nodata)] = np.nan
    out[r0 - row : r1 - row, c0 - col : c1 - col] = data
    return out

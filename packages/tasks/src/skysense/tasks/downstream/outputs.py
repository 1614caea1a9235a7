"""What `skysense infer` writes, and how it never leaves half a file under the destination's name.

Every output is first written beside the destination under ``.<name>.partial-<pid>*`` names
(:class:`StagedOutput`) and renamed onto the destination only when complete; the partial files
are removed on any exit, including SIGTERM (:func:`terminate_as_interrupt`), and a later run
removes those a killed run left (:func:`remove_stale_partials`).

Rasters: a tiled GeoTIFF written block by block (:func:`raster_profile`,
:func:`write_prediction`), then copied by GDAL's COG driver into a Cloud-Optimized GeoTIFF
(:func:`publish_cog`). Boxes: a GeoJSON FeatureCollection in the scene's CRS
(:func:`boxes_geojson`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
import torch

log = logging.getLogger(__name__)

CLASS_NODATA = 255


class StagedOutput:
    """Temporary names beside ``dst`` for one run, removed on exit whatever happens.

    ``path(suffix)`` names a partial file (``.<name>.partial-<pid><suffix>``);
    ``publish(path)`` renames a complete one onto ``dst``. Refuses an existing ``dst`` unless
    ``overwrite``.
    """

    def __init__(self, dst: str | Path, overwrite: bool = False):
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise FileExistsError(f"{self.dst} exists (overwrite=true to replace it)")
        self._paths: list[Path] = []

    def path(self, suffix: str = "") -> Path:
        p = self.dst.with_name(f".{self.dst.name}.partial-{os.getpid()}{suffix}")
        self._paths.append(p)
        return p

    def publish(self, path: Path) -> None:
        os.replace(path, self.dst)

    def __enter__(self) -> StagedOutput:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        for p in self._paths:
            if p.exists():
                p.unlink()


def raster_profile(grid, output: str, n_out: int) -> dict:
    """The tiled GeoTIFF profile of a prediction on ``grid``: ``classes`` -> 1 uint8 band
    (nodata 255), ``probabilities`` -> ``n_out`` float32 bands (nodata NaN)."""
    classes = output == "classes"
    return {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "count": 1 if classes else n_out,
        "dtype": "uint8" if classes else "float32",
        "nodata": CLASS_NODATA if classes else float("nan"),
        "crs": grid.crs,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def write_prediction(
    out,
    prob: torch.Tensor,
    valid: np.ndarray,
    block: tuple[int, int, int, int],
    output: str,
    threshold: float | None = None,
) -> None:
    """One block of blended probabilities into the open raster ``out``.

    Args:
        prob: (C, h, w) float32 probabilities of the block ``(y0, y1, x0, x1)``.
        valid: (h, w) bool, pixels where the input had data (the others are written as nodata).
        output: ``classes`` (argmax, or ``P(class 1) >= threshold`` when a change model's
            validation threshold is given) or ``probabilities``.
    """
    y0, y1, x0, x1 = block
    win = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
    if output == "classes":
        if threshold:
            cls = (prob[1] >= threshold).numpy().astype(np.uint8)
        else:
            cls = prob.argmax(0).numpy().astype(np.uint8)
        cls[~valid] = CLASS_NODATA
        out.write(cls, 1, window=win)
    else:
        p = prob.numpy()
        p[:, ~valid] = np.nan
        out.write(p, window=win)


def publish_cog(tiled: Path, staged: StagedOutput, output: str) -> None:
    """Copy the complete tiled GeoTIFF into a Cloud-Optimized GeoTIFF (overviews: nearest for
    classes, average for probabilities) and rename it onto the destination."""
    cog = staged.path(".cog.tif")
    rasterio.shutil.copy(
        tiled,
        cog,
        driver="COG",
        COMPRESS="DEFLATE",
        BLOCKSIZE=256,
        OVERVIEW_RESAMPLING="NEAREST" if output == "classes" else "AVERAGE",
        BIGTIFF="IF_SAFER",
    )
    staged.publish(cog)


def boxes_geojson(boxes: torch.Tensor, scores, labels, classes, grid) -> dict:
    """Pixel boxes (N, 4) x0 y0 x1 y1 on ``grid`` as a GeoJSON FeatureCollection of polygons in
    the grid's CRS, each with its class name, score and pixel box."""
    feats = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        x0, y0, x1, y1 = box
        corners = ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))
        ring = [list(grid.transform @ (x, y)) for x, y in corners]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "label": classes[int(label)],
                    "score": round(float(score), 4),
                    "pixel_box": [x0, y0, x1, y1],
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": grid.crs.to_string()}},
        "features": feats,
    }


def publish_json(doc: dict, staged: StagedOutput) -> None:
    tmp = staged.path()
    tmp.write_text(json.dumps(doc))
    staged.publish(tmp)


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the ``.<name>.partial-<pid>*`` files that killed runs left beside ``dst`` (those
    whose process is gone). Returns the paths removed."""
    removed = []
    if not dst.parent.is_dir():
        return removed
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = p.name[len(f".{dst.name}.partial-") :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
        log.info("removed %s, left by an interrupted run", p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), so ``finally`` clauses that remove
    partial files run when a scheduler or a user terminates the process."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)

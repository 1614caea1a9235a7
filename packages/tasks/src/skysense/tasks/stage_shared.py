"""Stage the unlabelled real samples of ../shared/data as one GeoTIFF source folder for
``skysense ingest`` (the ``cpu_real`` pre-training recipe; ``make pretrain-real``).

    python -m skysense.tasks.stage_shared data/real/src      # then: skysense ingest SRC DST

What is staged (``SOURCES``; imagery only, no label file is read or linked):

- ``oscd/images/<city>/imgs_{1,2}/*.tif``: all 10 OSCD cities, two Sentinel-2 L1C dates each,
  as unlabelled imagery (the change masks of 6 of them are evaluation labels of the benchmark's
  ``shared`` suite: never read here, but the pixels of those cities are seen by pre-training).
- ``eolearn_slovenia/REFERENCE_SCENES.npy``: the 5-date Sentinel-2 L1C series of the Slovenia
  patch (float reflectance 0-1, 13 bands) written as 13-band uint16 GeoTIFFs (DN = reflectance x
  10000, band descriptions B1..B12) on the patch's footprint (``TestEOPatch/bbox.geojson``,
  EPSG:32633). Its dates are not recorded: the files are named with evenly spread days of 2017
  (1 Jan, 15 Mar, 27 May, 8 Aug, 20 Oct: the day-of-year spacing the benchmark's Slovenia probe
  uses). Its land-cover mask (the probe's labels) is not read.
- ``sentinel1/*.tif``: the pyroSAR Sentinel-1 VV scene (ingest with ``missing_bands=fill``: VH
  is absent).

Not staged: the aerial RGB tiles (``hr_rgb/usgs_rsvqa_hr``, 512 px at 0.2 m = 102 m a side). The
encoder pairs an HR crop with an S2 crop 8 times smaller (``hr_ratio=8``), so in one manifest
with the Sentinel places every sample carries a 512 px HR tile (0.5 GB of mostly empty HR for
the 660 Sentinel tiles, and the HR Swin on every sample: several times the CPU budget), and a
102 m tile covers 2.5 % of a 640 m Sentinel tile, below the ingest's ``min_valid_fraction``, so
each would be marked unusable. They need an HR-only ingest of their own (``skysense ingest
.../usgs_rsvqa_hr DST``), which pre-training reads as a separate run.

Folders are mirrored as symbolic links to the files (the ingest's folder walk does not follow
linked folders); staging is idempotent (a second call leaves what is there). The shared data
folder is ``$SKYSENSE_SHARED_DATA``, else ``../shared/data``; a source that is absent is skipped
with its reason, and nothing is staged when the folder itself is absent (exit status 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# (path under the shared data folder, folder name in the staged source)
SOURCES = (
    ("oscd/images", "oscd"),
    ("eolearn_slovenia/REFERENCE_SCENES.npy", "slovenia"),
    ("sentinel1", "s1_pyrosar"),
)
SLOVENIA_DATES = ("20170101", "20170315", "20170527", "20170808", "20171020")
L1C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


def shared_root() -> Path:
    """``$SKYSENSE_SHARED_DATA`` when set, else ``../shared/data`` (from the working folder)."""
    return Path(os.environ.get("SKYSENSE_SHARED_DATA") or "../shared/data").expanduser()


@dataclass
class Source:
    rel: str  # under the shared data folder
    name: str  # folder in the staged source
    path: Path
    files: list[Path]  # the files staged (GeoTIFFs; the .npy for Slovenia)
    reason: str | None  # why it is skipped; None when present


def plan(root: Path | None = None) -> list[Source]:
    """What :func:`stage` would stage from ``root``: each source with its files or the reason
    it is skipped."""
    root = Path(root) if root is not None else shared_root()
    out = []
    for rel, name in SOURCES:
        p = root / rel
        if not p.exists():
            out.append(Source(rel, name, p, [], f"{p} does not exist"))
            continue
        if p.is_file():
            files = [p]
        else:
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and (f.suffix.lower() in (".tif", ".tiff") or f.name == "dates.txt")
            )
        tifs = [f for f in files if f.name != "dates.txt"]
        reason = None if tifs else f"{p} holds no GeoTIFF"
        out.append(Source(rel, name, p, files if tifs else [], reason))
    return out


def _write_slovenia(npy: Path, dst: Path) -> list[Path]:
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    bbox = json.loads((npy.parent / "TestEOPatch" / "bbox.geojson").read_text())
    xs = [c[0] for c in bbox["coordinates"][0]]
    ys = [c[1] for c in bbox["coordinates"][0]]
    epsg = bbox["crs"]["properties"]["name"].rsplit(":", 1)[-1]
    img = np.load(npy, allow_pickle=False)  # (T, H, W, 13) float32 reflectance 0-1
    if img.ndim != 4 or img.shape[-1] != len(L1C_BANDS) or img.shape[0] > len(SLOVENIA_DATES):
        raise ValueError(f"{npy}: shape {img.shape} is not (T<=5, H, W, 13)")
    _, h, w, _ = img.shape
    transform = from_bounds(min(xs), min(ys), max(xs), max(ys), w, h)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for t in range(img.shape[0]):
        path = dst / f"S2_MSIL1C_{SLOVENIA_DATES[t]}.tif"
        out.append(path)
        if path.exists():
            continue
        dn = np.clip(np.rint(img[t] * 10000.0), 1, 65535).astype("uint16").transpose(2, 0, 1)
        tmp = path.with_suffix(".tmp.tif")
        profile = dict(
            driver="GTiff", width=w, height=h, count=dn.shape[0], dtype="uint16",
            crs=f"EPSG:{epsg}", transform=transform, nodata=0,
        )  # fmt: skip
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(dn)
            for i, b in enumerate(L1C_BANDS, start=1):
                ds.set_band_description(i, b)
        tmp.replace(path)
    return out


def stage(dst: Path, root: Path | None = None) -> list[Source]:
    """Mirror the sources of ``root`` into ``dst`` (file symlinks; Slovenia as GeoTIFFs);
    returns :func:`plan`'s list. Idempotent."""
    dst = Path(dst)
    sources = plan(root)
    for s in sources:
        if s.reason:
            continue
        if s.name == "slovenia":
            _write_slovenia(s.files[0], dst / s.name)
            continue
        for f in s.files:
            link = dst / s.name / f.relative_to(s.path)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(f.resolve())
    return sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m skysense.tasks.stage_shared", description=__doc__.splitlines()[0]
    )
    ap.add_argument("dst", type=Path, help="the staged source folder (SRC of skysense ingest)")
    ap.add_argument("--root", type=Path, default=None, help="shared data folder")
    a = ap.parse_args(argv)
    root = a.root or shared_root()
    if not root.is_dir():
        print(
            f"stage_shared: {root} does not exist (set SKYSENSE_SHARED_DATA to the folder of "
            "the real samples); nothing staged",
            file=sys.stderr,
        )
        return 3
    sources = stage(a.dst, root)
    for s in sources:
        if s.reason:
            print(f"stage_shared: skipped {s.rel}: {s.reason}")
        else:
            print(f"stage_shared: {s.rel} -> {a.dst / s.name} ({len(s.files)} file(s))")
    if all(s.reason for s in sources):
        print("stage_shared: no source found; nothing to ingest", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

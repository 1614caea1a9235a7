"""Fixtures of the data tests: GeoTIFF folders made on the spot, and ingested manifests.

``planted`` places carry their own pixel coordinates as values, so a test can tell where any
output pixel came from: Sentinel-2 band 0 = row + 1, band 1 = col + 1 (Sentinel pixels), band 2
= step + 1; Sentinel-1 VV = row, VH = col; HR red = 10 x Sentinel row, green = 10 x Sentinel
col, blue = 8 x (HR row mod 8) + (HR col mod 8).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from skysense.data.io import write_geotiff
from skysense.data.sensors import S2_MODEL_BANDS

UTM = "EPSG:32631"
TILE = 24
RATIO = 8


def planted_place(root: Path, name: str, i: int, n_s2: int = 5, n_s1: int = 3) -> Path:
    """One place of ``TILE`` x ``TILE`` 10 m pixels with coordinate-coded values."""
    d = root / name
    x0, y0 = 500_000.0 + 1_000.0 * i, 4_800_000.0
    t10 = Affine(10.0, 0, x0, 0, -10.0, y0)
    rows, cols = np.mgrid[0:TILE, 0:TILE]
    for k in range(n_s2):
        date = dt.date(2021, 1, 10) + dt.timedelta(days=37 * k + 3 * i)
        a = np.full((10, TILE, TILE), 1000, np.uint16)
        a[0], a[1], a[2] = rows + 1, cols + 1, k + 1
        write_geotiff(
            d / "s2" / f"S2A_MSIL2A_{date:%Y%m%d}.tif",
            a,
            crs=UTM,
            transform=t10,
            nodata=0,
            band_names=list(S2_MODEL_BANDS),
        )
    for k in range(n_s1):
        date = dt.date(2021, 2, 1) + dt.timedelta(days=50 * k + i)
        a = np.stack([rows, cols]).astype(np.float32)
        write_geotiff(
            d / "s1" / f"S1A_IW_GRDH_{date:%Y%m%d}_db.tif",
            a,
            crs=UTM,
            transform=t10,
            band_names=["VV", "VH"],
        )
    H = TILE * RATIO
    hr_r, hr_c = np.mgrid[0:H, 0:H]
    rgb = np.stack([(hr_r // RATIO) * 10, (hr_c // RATIO) * 10, (hr_r % RATIO) * 8 + hr_c % RATIO])
    write_geotiff(
        d / "hr" / "rgb_20210601.tif",
        rgb.astype(np.uint8),
        crs=UTM,
        transform=Affine(10.0 / RATIO, 0, x0, 0, -10.0 / RATIO, y0),
    )
    return d


@pytest.fixture(scope="session")
def planted_manifest(tmp_path_factory) -> Path:
    """Six planted places (4 train, 2 val by labels.csv), ingested with 24 px tiles."""
    from skysense.data.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("planted")
    src = root / "src"
    lines = ["group,label,split"]
    for i in range(6):
        planted_place(src, f"p{i}", i, n_s2=3 + i, n_s1=2 + i % 3)
        lines.append(f"p{i},{'ab'[i % 2]},{'val' if i >= 4 else 'train'}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    rep = ingest(
        src,
        root / "dst",
        IngestConfig(tile_size=TILE, hr_ratio=RATIO, shard_size=4),
        progress=False,
    )
    assert rep.ok, rep.format()
    return rep.manifest


@pytest.fixture(scope="session")
def embedded_manifest(tmp_path_factory) -> Path:
    """The embedded sample (48 places), made once per test session."""
    from skysense.data.embedded import ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("embedded"))

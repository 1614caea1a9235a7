"""Small GeoTIFFs with the profile of the real files, and the checks every fault test makes.

Sentinel-2 places are per-band files as OSCD and BigEarthNet distribute them (13 uint16 files,
10/20/60 m, one UTM CRS, ``<tile>_<date>T..._B02.tif`` names); Sentinel-1 is a VV/VH pair of
float32 files in dB as in BigEarthNet-S1. A 10 m band of ``n`` pixels is a few kB.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
from _cli_helpers import SKYSENSE, env, fault_line
from _cli_helpers import checksums as _checksums
from affine import Affine

from skysense.data import io
from skysense.data.sensors import SENSORS

UTM = "EPSG:32633"
X0, Y0 = 404_400.0, 5_342_400.0  # a BigEarthNet patch corner (UTM 33N)


def s2_place(
    folder: Path,
    date=dt.date(2017, 6, 13),
    n10: int = 40,
    x0: float = X0,
    seed=0,
    value=None,
    nan_every: int = 0,
    dtype="uint16",
) -> list[Path]:
    """Per-band S2 L2A files of one acquisition (13 bands at native GSD) under ``folder``."""
    rng = np.random.default_rng(seed)
    spec = SENSORS["s2_l2a"]
    out = []
    for k, band in enumerate(spec.bands):
        gsd = spec.native_gsd(band)
        n = max(2, int(n10 * 10 / gsd))
        a = (300 + 100 * k + rng.integers(0, 200, (n, n))).astype(dtype)
        if value is not None:
            a[:] = value
        if nan_every and band in ("B4", "B5"):  # a 10 m and a 20 m band
            a = a.astype(np.float32)
            a.reshape(-1)[::nan_every] = np.nan
        name = f"S2A_MSIL2A_{date:%Y%m%d}T101031_{band if len(band) == 3 else 'B0' + band[1:]}.tif"
        out.append(
            io.write_geotiff(folder / name, a, crs=UTM, transform=Affine(gsd, 0, x0, 0, -gsd, Y0))
        )
    return out


def s1_place(folder: Path, date=dt.date(2017, 6, 13), n: int = 40, x0: float = X0) -> list[Path]:
    """A BigEarthNet-S1-like VV/VH pair (float32 dB, 10 m)."""
    out = []
    for pol, base in (("VV", -10.0), ("VH", -17.0)):
        a = (base + np.linspace(0, 2, n * n).reshape(n, n)).astype(np.float32)
        name = f"S1A_IW_GRDH_1SDV_{date:%Y%m%d}T165043_{pol}.tif"
        out.append(
            io.write_geotiff(folder / name, a, crs=UTM, transform=Affine(10, 0, x0, 0, -10, Y0))
        )
    return out


def source(root: Path, n_places: int = 2, **kw) -> Path:
    """``root`` with ``n_places`` S2 places (folders ``place_00`` ...), each 2 acquisitions."""
    for i in range(n_places):
        for d in (dt.date(2017, 6, 13), dt.date(2017, 8, 2)):
            s2_place(root / f"place_{i:02d}" / f"{d:%Y%m%d}", d, seed=i, **kw)
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` but the lock file (what a failed command must leave
    unchanged)."""
    return _checksums(*roots, ignore=(".ingest.lock",))


def cli(tmp_path: Path, *args, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """``skysense ingest ARGS`` in a subprocess."""
    return subprocess.run(
        [str(SKYSENSE), "ingest", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(tmp_path),
        **kw,
    )


def python(tmp_path: Path, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (faults injected there, then the CLI's main called)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(tmp_path),
    )


def one_line(proc, *fragments: str, rc: int | None = None) -> str:
    """The command failed with exit code ``rc`` (any non-zero when None) and one line on stderr
    that starts with ``skysense ingest:`` and holds every fragment; no traceback anywhere."""
    return fault_line(proc, "ingest", *fragments, rc=rc)


def manifest_rows(dst: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{dst / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def content(dst: Path):
    """(sample rows, pixel arrays) of the ingest in ``dst``: equal for equal ingests."""
    from skysense.data.manifest import Manifest
    from skysense.data.shards import ShardReader

    m = Manifest(dst)
    r = ShardReader(m)
    rows = m.query("SELECT id, name, split, lat, lon, s2_dates, s2_valid FROM samples ORDER BY id")
    pix = [np.asarray(r.arrays(s)["s2"][o]) for s, o in zip(m.samples.shard, m.samples.offset)]
    return rows, pix

"""The embedded sample: a small, plausible three-sensor data set made on the spot.

:func:`ensure_embedded` writes real GeoTIFFs with a CRS (WGS 84 / UTM 31N, southern France)
for ``n_samples`` places, then ingests them with :func:`skysense.data.ingest.ingest`:

- HR RGB, uint8, 192 x 192 px at 1.25 m (8 HR pixels per 10 m pixel), one date;
- Sentinel-2 L2A, 10 bands, uint16, 24 x 24 px at 10 m, 6-12 dates over 2021, some cloudy
  (with a cloud mask file, ``*_CLM.tif``) and some with a nodata edge;
- Sentinel-1 VV/VH in dB, float32, 3-8 dates, with speckle (gamma, 4 looks).

Layouts vary on purpose, so ingest reads both: one place in eight has per-band S2 folders
(one file per band, 20 m bands at 12 x 12 px), the others 10-band stacks; one in six has per-band
S1 files, the others VV/VH stacks.

Each place has a land-cover ``label`` of five classes whose signal lives in the phenology (the
two croplands differ only in the timing of their green-up), the texture (crop rows, tree crowns,
streets) and the backscatter, with per-place brightness, offsets and date phase so that the
per-band mean alone does not separate them. Samples are split 5:1 into train and val.

Generation and ingest of the default 48 samples take a few seconds; a second call returns the
manifest at once. The build happens under a lock and in temporary names: a killed run leaves no
manifest that looks complete.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from skysense.data.io import write_geotiff
from skysense.data.manifest import FILENAME, Manifest, ManifestError, ManifestWriter
from skysense.data.sensors import S2_MODEL_BANDS

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
CRS = "EPSG:32631"
TILE = 24  # Sentinel pixels (10 m)
HR_RATIO = 8  # HR pixels per Sentinel pixel (1.25 m)
YEAR = 2021
CLASSES = ("cropland_spring", "cropland_summer", "forest", "grassland", "urban")

# Reflectance x 10000 of the three end-members, in the model's band order
# B2 B3 B4 B5 B6 B7 B8 B8A B11 B12.
SOIL = np.array([900, 1200, 1500, 1800, 2000, 2100, 2200, 2300, 2800, 2300], np.float32)
VEG = np.array([300, 650, 350, 1100, 2800, 3400, 3700, 3800, 1900, 950], np.float32)
URBAN = np.array([1300, 1400, 1500, 1650, 1800, 1850, 1900, 1950, 2300, 2100], np.float32)
CLOUD = np.array([5500, 5600, 5800, 5900, 6000, 6000, 6100, 6100, 4000, 3000], np.float32)
_20M = ("B5", "B6", "B7", "B8A", "B11", "B12")


def _gauss(doy, centre, width):
    return np.exp(-0.5 * ((doy - centre) / width) ** 2)


def phenology(cls: int, doy: np.ndarray, phase: float) -> np.ndarray:
    """Vegetation fraction (0-1) of a class over the year (``phase`` shifts it, days)."""
    d = np.asarray(doy, np.float32) - phase
    # The four vegetated classes have about the same yearly mean (~0.4): what tells them apart
    # is when and how fast they green up, not how green they are on average.
    if cls == 0:  # spring crop: green in April-May, harvested in June
        return 0.12 + 0.85 * _gauss(d, 125, 40)
    if cls == 1:  # summer crop (maize): sown late, green in July-August
        return 0.12 + 0.85 * _gauss(d, 215, 40)
    if cls == 2:  # deciduous forest: a broad plateau from May to October
        return 0.22 + 0.42 * _gauss(d, 195, 75)
    if cls == 3:  # grassland: green early, mown in June, regrows
        return 0.34 + 0.3 * _gauss(d, 130, 45) - 0.25 * _gauss(d, 165, 10)
    return 0.08 + 0.04 * _gauss(d, 180, 60)  # urban


def _smooth_noise(rng, shape, scale: int) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise upsampled bilinearly."""
    h, w = shape
    ch, cw = max(2, h // scale + 2), max(2, w // scale + 2)
    coarse = rng.random((ch, cw)).astype(np.float32)
    ys = np.linspace(0, ch - 1.001, h)
    xs = np.linspace(0, cw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    out = a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo + 1e-6)


def _layout(cls: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(parcel id map (H, W) int at HR resolution, intensity map in [0, 1]) of one place."""
    H = TILE * HR_RATIO
    yy, xx = np.mgrid[0:H, 0:H].astype(np.float32)
    if cls in (0, 1):  # 2-4 rectangular parcels
        cut_x = int(rng.integers(H // 4, 3 * H // 4))
        cut_y = int(rng.integers(H // 4, 3 * H // 4))
        parcels = (xx >= cut_x).astype(int) + 2 * (yy >= cut_y).astype(int)
        return parcels, _smooth_noise(rng, (H, H), 48)
    if cls == 4:  # street grid
        step = int(rng.integers(36, 56))
        off = rng.integers(0, step, 2)
        street = (((xx + off[0]) % step) < 6) | (((yy + off[1]) % step) < 6)
        return street.astype(int), _smooth_noise(rng, (H, H), 24)
    return np.zeros((H, H), int), _smooth_noise(rng, (H, H), 32 if cls == 2 else 64)


def _hr_image(cls, rng, parcels, field, veg, brightness) -> np.ndarray:
    """(3, H, W) uint8 RGB at 1.25 m with the class's texture."""
    H = parcels.shape[0]
    yy, xx = np.mgrid[0:H, 0:H].astype(np.float32)
    green = np.array([70, 110, 55], np.float32)
    bare = np.array([150, 125, 95], np.float32)
    img = np.empty((3, H, H), np.float32)
    if cls in (0, 1):
        for p in range(4):
            sel = parcels == p
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(3.0, 6.0)
            rows = 0.5 + 0.5 * np.sin(
                (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
            )
            v = np.clip(veg * (0.6 + 0.4 * rows) * rng.uniform(0.8, 1.2), 0, 1)
            for c in range(3):
                img[c][sel] = (bare[c] * (1 - v) + green[c] * v)[sel]
    elif cls == 2:
        img[:] = (green * 0.6)[:, None, None]
        for _ in range(int(rng.integers(120, 180))):
            cy, cx, r = rng.uniform(0, H), rng.uniform(0, H), rng.uniform(3, 9)
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            crown = np.clip(1 - d2 / (r * r), 0, 1)
            shade = rng.uniform(0.8, 1.4)
            img += crown[None] * (green * shade * 0.6)[:, None, None] * veg
    elif cls == 3:
        v = np.clip(veg * (0.7 + 0.6 * field), 0, 1)
        for c in range(3):
            img[c] = bare[c] * (1 - v) + green[c] * v
        img += rng.normal(0, 6, img.shape).astype(np.float32)
    else:
        roof = (
            np.array([165, 90, 75], np.float32)
            if rng.random() < 0.5
            else np.array([140, 140, 145], np.float32)
        )
        img[:] = roof[:, None, None] * (0.8 + 0.4 * (field > 0.5))[None]
        street = parcels == 1
        img[:, street] = 95.0
        img += rng.normal(0, 10, img.shape).astype(np.float32)
    img = img * brightness + rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _dates(rng, n: int) -> list[dt.date]:
    doys = np.sort(rng.choice(np.arange(5, 361), size=n, replace=False))
    return [dt.date(YEAR, 1, 1) + dt.timedelta(days=int(d) - 1) for d in doys]


def _write_place(root: Path, i: int, cls: int, rng) -> None:
    name = f"place_{i:04d}"
    d = root / name
    # Places sit 2 km apart on a grid, well inside UTM zone 31N.
    x0 = 380_000.0 + (i % 8) * 2_000.0
    y0 = 4_820_000.0 - (i // 8) * 2_000.0
    t10 = Affine(10.0, 0, x0, 0, -10.0, y0)
    # Per-place nuisance: illumination / soil brightness, an additive offset, a shift of the
    # season and the vigour of the vegetation, so that per-band means overlap between classes.
    brightness = float(rng.uniform(0.65, 1.35))
    offset = float(rng.normal(0, 150))
    phase = float(rng.uniform(-15, 15))
    vigour = float(rng.uniform(0.7, 1.3))
    parcels, field = _layout(cls, rng)
    # 10 m structure = the HR layout averaged over 8 x 8 blocks, so the sensors agree.
    f10 = field.reshape(TILE, HR_RATIO, TILE, HR_RATIO).mean(axis=(1, 3))
    p10 = parcels.reshape(TILE, HR_RATIO, TILE, HR_RATIO).mean(axis=(1, 3))
    parcel_gain = rng.uniform(0.75, 1.15, 4).astype(np.float32)
    urban_frac = p10 if cls == 4 else np.zeros_like(f10)

    # Sentinel-2
    n2 = int(rng.integers(6, 13))
    per_band = i % 8 == 0
    for date in _dates(rng, n2):
        doy = date.timetuple().tm_yday
        v = min(1.0, vigour * phenology(cls, np.array([doy]), phase)[0])
        if cls in (0, 1):
            pid = np.rint(parcels.reshape(TILE, HR_RATIO, TILE, HR_RATIO)[:, 0, :, 0]).astype(int)
            vmap = np.clip(v * parcel_gain[pid] * (0.85 + 0.3 * f10), 0, 1)
        else:
            vmap = np.clip(v * (0.8 + 0.4 * f10), 0, 1)
        refl = (
            SOIL[:, None, None] * (1 - vmap) * (1 - urban_frac)
            + VEG[:, None, None] * vmap * (1 - urban_frac)
            + URBAN[:, None, None] * (0.4 + 0.6 * urban_frac if cls == 4 else urban_frac)
        )
        if cls == 4:
            refl = 0.5 * refl + 0.5 * URBAN[:, None, None] * (0.9 + 0.2 * f10)
        refl = refl * brightness + offset + rng.normal(0, 40, refl.shape).astype(np.float32)
        cloud = np.zeros((TILE, TILE), bool)
        if rng.random() < 0.25:  # a cloud
            cy, cx, r = rng.uniform(0, TILE, 2).tolist() + [rng.uniform(4, 10)]
            yy, xx = np.mgrid[0:TILE, 0:TILE]
            cloud = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            refl = np.where(cloud[None], CLOUD[:, None, None], refl)
        dn = np.clip(np.rint(refl), 1, 65535).astype(np.uint16)
        if rng.random() < 0.12:  # swath edge: no data on the left columns
            dn[:, :, : int(rng.integers(3, 10))] = 0
        stamp = date.strftime("%Y%m%d")
        if per_band:
            folder = d / "s2" / stamp
            for b, band in enumerate(S2_MODEL_BANDS):
                fname = (
                    f"S2B_MSIL2A_{stamp}T103021_{band if len(band) == 3 else 'B0' + band[1:]}.tif"
                )
                if band in _20M:
                    a = dn[b].reshape(TILE // 2, 2, TILE // 2, 2).astype(np.float32)
                    a = np.where((a == 0).any(axis=(1, 3)), 0, a.mean(axis=(1, 3)))
                    write_geotiff(
                        folder / fname,
                        np.rint(a).astype(np.uint16),
                        crs=CRS,
                        transform=Affine(20.0, 0, x0, 0, -20.0, y0),
                        nodata=0,
                    )
                else:
                    write_geotiff(folder / fname, dn[b], crs=CRS, transform=t10, nodata=0)
            mask_path = folder / f"S2B_MSIL2A_{stamp}T103021_CLM.tif"
        else:
            write_geotiff(
                d / "s2" / f"S2A_MSIL2A_{stamp}T103021.tif",
                dn,
                crs=CRS,
                transform=t10,
                nodata=0,
                band_names=list(S2_MODEL_BANDS),
                interleave="pixel",
            )
            mask_path = d / "s2" / f"S2A_MSIL2A_{stamp}T103021_CLM.tif"
        if cloud.any():
            write_geotiff(mask_path, cloud.astype(np.uint8), crs=CRS, transform=t10)

    # Sentinel-1: footprint 2 px larger on each side (ingest keeps the shared footprint).
    t1 = Affine(10.0, 0, x0 - 20.0, 0, -10.0, y0 + 20.0)
    S1 = TILE + 4
    fpad = np.pad(f10, 2, mode="edge")
    upad = np.pad(urban_frac, 2, mode="edge")
    n1 = int(rng.integers(3, 9))
    base = {
        0: (-10.8, -17.5),
        1: (-11.0, -17.8),
        2: (-9.8, -16.3),
        3: (-10.4, -17.2),
        4: (-5.0, -12.5),
    }
    vv0, vh0 = base[cls]
    off1 = rng.normal(0, 1.5, 2)
    for date in _dates(rng, n1):
        doy = date.timetuple().tm_yday
        v = min(1.0, vigour * phenology(cls, np.array([doy]), phase)[0])
        # Crops: backscatter follows the canopy; forest: volume scattering, little seasonality.
        gain = (4.0, 6.0) if cls in (0, 1) else (1.5, 2.5)
        vv = vv0 + off1[0] + gain[0] * (v - 0.4) + 2.0 * (fpad - 0.5) + 6.0 * upad * (cls == 4)
        vh = vh0 + off1[1] + gain[1] * (v - 0.4) + 2.0 * (fpad - 0.5)
        looks = 4.0
        speckle = rng.gamma(looks, 1.0 / looks, (2, S1, S1))
        lin = 10.0 ** (np.stack([vv, vh]) / 10.0) * speckle
        db = (10.0 * np.log10(lin)).astype(np.float32)
        stamp = date.strftime("%Y%m%d")
        if i % 6 == 1:
            for b, pol in enumerate(("VV", "VH")):
                write_geotiff(
                    d / "s1" / f"S1A_IW_GRDH_{stamp}T174512_{pol}_db.tif",
                    db[b],
                    crs=CRS,
                    transform=t1,
                )
        else:
            write_geotiff(
                d / "s1" / f"S1A_IW_GRDH_{stamp}T174512_db.tif",
                db,
                crs=CRS,
                transform=t1,
                band_names=["VV", "VH"],
                interleave="pixel",
            )

    # HR
    hr_date = _dates(rng, 1)[0]
    veg_hr = min(1.0, vigour * phenology(cls, np.array([hr_date.timetuple().tm_yday]), phase)[0])
    img = _hr_image(cls, rng, parcels, field, veg_hr, float(rng.uniform(0.7, 1.3)))
    write_geotiff(
        d / "hr" / f"aerial_rgb_{hr_date.strftime('%Y%m%d')}.tif",
        img,
        crs=CRS,
        transform=Affine(10.0 / HR_RATIO, 0, x0, 0, -10.0 / HR_RATIO, y0),
        band_names=["red", "green", "blue"],
        tags={"ACQUISITION_DATE": hr_date.isoformat()},
        interleave="pixel",
    )


def _write_places(root: Path, items: list[tuple[int, int]], seed: int) -> None:
    with rasterio.Env():  # one GDAL environment for many files, not one per file
        for i, cls in items:
            _write_place(root, i, cls, np.random.default_rng([seed, i]))


def generate(root, n_samples: int = 48, seed: int = 0, *, workers: int = 0) -> Path:
    """Write the GeoTIFFs, ``labels.csv`` and ``classes.txt`` of the sample under ``root``.

    Place ``i`` draws from ``default_rng([seed, i])``, so ``workers`` processes writing places
    in parallel give the same files as one.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.arange(n_samples) % len(CLASSES))
    items = [(i, int(classes[i])) for i in range(n_samples)]
    if workers and workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [items[k::workers] for k in range(workers)]
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_places, [root] * workers, chunks, [seed] * workers))
    else:
        _write_places(root, items, seed)
    rows = ["group,label,split"]
    for i, cls in items:
        split = "val" if i % 6 == 5 else "train"
        rows.append(f"place_{i:04d},{CLASSES[cls]},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_current(manifest: Path, params: dict) -> bool:
    try:
        m = Manifest(manifest)
    except (ManifestError, Exception):  # noqa: BLE001 - anything unreadable means "rebuild"
        return False
    return m.meta.get("embedded") == params


def ensure_embedded(root=None, n_samples: int = 48, seed: int = 0, *, workers: int = 2) -> Path:
    """The embedded sample's manifest under ``root``, generated and ingested if needed.

    ``root`` defaults to ``$SKYSENSE_DATA_HOME`` or ``data/embedded``. Returns the path of
    ``manifest.sqlite`` (its shards beside it; the GeoTIFFs in ``root/raw``). Idempotent: a
    complete manifest made with the same ``n_samples`` and ``seed`` is returned as it is.
    Safe against concurrent callers (a file lock) and interruption (temporary names).
    ``workers`` processes share the ingest (0: all in this process).
    """
    root = Path(root or os.environ.get("SKYSENSE_DATA_HOME", "data/embedded"))
    if n_samples < 6:
        raise ValueError(f"n_samples must be >= 6 (train and val splits), got {n_samples}")
    params = {"n_samples": n_samples, "seed": seed, "version": GENERATOR_VERSION}
    manifest = root / FILENAME
    if _is_current(manifest, params):
        return manifest
    with _lock(root):
        if _is_current(manifest, params):  # another process built it while we waited
            return manifest
        from skysense.data.ingest import IngestConfig, ingest

        t0 = time.perf_counter()
        raw = root / "raw"
        tmp = root / f"raw.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, n_samples, seed, workers=workers)
        shutil.rmtree(raw, ignore_errors=True)
        tmp.rename(raw)
        t1 = time.perf_counter()
        report = ingest(
            raw,
            root,
            IngestConfig(
                tile_size=TILE,
                hr_ratio=HR_RATIO,
                shard_size=16,
                workers=workers,
                cluster="pool",  # 48 small places: a Dask cluster's start-up costs more
                overwrite=True,
            ),
            progress=False,
        )
        if report.bad_files:
            raise RuntimeError(
                "the embedded sample has bad files (a bug): "
                + "; ".join(f"{p}: {r}" for p, r in report.bad_files[:5])
            )
        w = ManifestWriter(manifest)
        try:
            w.set_meta(embedded=params)
        finally:
            w.close()
        log.info(
            "embedded sample: %d samples in %s (generated in %.1f s, ingested in %.1f s)",
            report.n_samples,
            root,
            t1 - t0,
            time.perf_counter() - t1,
        )
    return manifest


__all__ = ["CLASSES", "ensure_embedded", "generate", "phenology"]

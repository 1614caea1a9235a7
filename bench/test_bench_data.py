"""Data: loader throughput on ingested shards beside reading the same samples straight from their
GeoTIFFs with rasterio per sample (the way TorchGeo-style datasets do), same batch contents.

The baseline is the loader's own batch assembly with its pixel source swapped: instead of
slicing the memory-mapped shards, every sample's tile (or view window) is warped out of its
source GeoTIFFs with rasterio on each access, using the manifest only as the file index (as a
TorchGeo dataset uses its R-tree), with at most 128 files kept open (TorchGeo's handle cache).
Normalisation, flips, padding and collation are the same code, so the batches are checked equal
(every key, ``torch.equal``) before anything is timed, and the ratio is about the storage.

Figures (samples/s, ratio = GeoTIFF time / shard time, > 1: shards faster; acceptance >= 5):
plain batches of the embedded sample with the torch and DALI backends, pre-training views, and
BigEarthNet (per-band 10/20/60 m S2 + S1) where ../shared/data is present.

Ingest memory: peak RSS of a whole ingest (fresh process) on sparse tiled places of 2000^2,
8000^2 and 32000^2 pixels (quick: 1000^2 to 4000^2), a scaling series, and its flatness (peak
at the smallest place / peak at the largest; goal: flat within 20 %, ratio >= 0.83).

Shards at scale (issue 20; ../shared/data's OSCD cities, USGS aerial tiles and BigEarthNet):
bytes per sample of compressed shards beside raw ones and of raw shards beside the source
GeoTIFFs; whole-sample decoding (DALI's image decoder beside Pillow, Pillow beside the raw
memory map); pre-training views from compressed beside raw shards per backend; and ingest
places/s on a 2-worker beside a 1-worker Dask LocalCluster.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from benchlib import QUICK, compare

from skysense.data.assemble import BatchAssembler
from skysense.data.discover import Acquisition
from skysense.data.geo import Grid
from skysense.data.ingest import IngestConfig, Sources, ingest, read_acquisition, to_store
from skysense.data.loader import Loader, build_loader, dali_available
from skysense.data.shards import CLEAR, HAS_DATA

GROUP = "data"
BATCH = 4 if QUICK else 8


class GeoTiffAssembler(BatchAssembler):
    """TorchGeo-style baseline: pixels warped from the source GeoTIFFs on every access."""

    def __init__(self, loader: Loader, max_open: int = 128):
        a = loader.assembler
        super().__init__(
            a.manifest,
            a.schedule,
            modalities=a.modalities,
            views=a.views,
            view_config=a.view_config,
            seed=a.seed,
        )
        m = self.manifest
        self.cfg = IngestConfig(**m.meta["config"])
        self.src = Sources(max_open=max_open)
        self.grids = {
            g: Grid(rasterio.crs.CRS.from_string(crs), Affine(*json.loads(t)), h, w)
            for g, crs, t, h, w in m.query("SELECT grp, crs, transform, height, width FROM groups")
        }
        self.acqs: dict[tuple[str, str], list[tuple[int, Acquisition]]] = {}
        for grp, mod, _step, days, files in m.query(
            "SELECT grp, modality, step, days, files FROM acquisitions ORDER BY grp, modality, step"
        ):
            acq = Acquisition.from_description(mod, None, json.loads(files))
            self.acqs.setdefault((grp, mod), []).append((days or 0, acq))
        self.rows = {
            r[0]: r
            for r in m.query(
                "SELECT id, grp, row, col, hr_dates, hr_valid, s2_valid, s1_valid FROM samples"
            )
        }

    def _sample_meta(self, sid: int):
        _, grp, _, _, _, _, s2_valid, s1_valid = self.rows[sid]
        valid = {"s2": s2_valid, "s1": s1_valid}
        usable, present, days = {}, {}, {}
        for m in self.series:
            usable[m] = np.array([c == "1" for c in valid[m] or ""], bool)
            present[m] = np.ones(len(usable[m]), bool)
            days[m] = np.array([d for d, _ in self.acqs.get((grp, m), [])], np.int32)
        return -1, -1, usable, present, days

    def _window(self, s, ratio: int) -> Grid:
        _, grp, row, col, *_ = self.rows[s.sid]
        p = s.params
        g = self.grids[grp].window(row + p.top, col + p.left, p.size, p.size)
        return g.scaled(ratio) if ratio > 1 else g

    def _read(self, acq, grid, modality):
        data, has, clear = read_acquisition(acq, grid, self.cfg, self.src)
        mask = has.astype(np.uint8) * HAS_DATA + (clear & has).astype(np.uint8) * CLEAR
        return to_store(modality, data, has), mask

    def raw_series(self, s, m, T):
        grp = self.rows[s.sid][1]
        grid = self._window(s, 1)
        data = np.zeros(
            (T, grid.height, grid.width, 10 if m == "s2" else 2),
            np.uint16 if m == "s2" else np.float32,
        )
        mask = np.zeros((T, grid.height, grid.width), np.uint8)
        for t, k in enumerate(s.params.steps[m]):
            data[t], mask[t] = self._read(self.acqs[(grp, m)][k][1], grid, m)
        return data, mask

    def _hr_acq(self, s):
        _, grp, _, _, hr_dates, hr_valid, *_ = self.rows[s.sid]
        from skysense.data.dates import EPOCH

        acqs = self.acqs[(grp, "hr")]
        for days, acq in acqs:
            if not hr_dates or (EPOCH.toordinal() + days) == _ordinal(hr_dates):
                return days, acq, hr_valid
        return acqs[0][0], acqs[0][1], hr_valid

    def raw_hr(self, s):
        _, acq, _ = self._hr_acq(s)
        return self._read(acq, self._window(s, self.hr_ratio), "hr")

    def hr_day(self, s):
        days, _, valid = self._hr_acq(s)
        return days, 2 if valid == "1" else 1


def _ordinal(iso: str) -> int:
    import datetime as dt

    return dt.date.fromisoformat(iso).toordinal()


def _baseline(loader: Loader) -> Loader:
    return Loader(GeoTiffAssembler(loader), "torch", 0)


def _assert_same(a, b):
    fa = a if "view1" not in a else {f"{v}.{k}": t for v in a for k, t in a[v].items()}
    fb = b if "view1" not in b else {f"{v}.{k}": t for v in b for k, t in b[v].items()}
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), f"{k}: shards and GeoTIFFs disagree"


def _measure(report, name, loaders: dict, n_samples: int, params: dict, note=""):
    """Check every loader's batches equal the GeoTIFF baseline's, then time whole epochs."""
    base = list(loaders["geotiff"])
    for key, loader in loaders.items():
        if key != "geotiff":
            got = list(loader)
            assert len(got) == len(base)
            for x, y in zip(got, base):
                _assert_same(x, y)
    # The equality pass above warmed every loader up (DALI pipeline built, files cached).
    epochs = {k: (lambda lo=lo: sum(1 for _ in lo)) for k, lo in loaders.items()}
    # Rounds until the fastest loader has run 1 s in all: a 6-patch epoch takes 5 ms.
    t = compare(epochs, repeat=1 if QUICK else 3, warmup=0, min_time=0 if QUICK else 1.0)
    for key in loaders:
        if key == "geotiff":
            continue
        report.add(
            GROUP, f"{name}_{key}_samples_per_s", n_samples / t[key], "samples/s",
            baseline=n_samples / t["geotiff"],
            baseline_name="rasterio per sample from the GeoTIFFs (TorchGeo style), same batches",
            ratio=t["geotiff"] / t[key], params={**params, "backend": key},
            note=note or "acceptance: ratio >= 5 (batch contents checked equal first)",
            spread=t.spread(key, "geotiff"),
        )  # fmt: skip


def test_loader_vs_geotiff_plain(report, embedded):
    kw = dict(split=None, batch_size=BATCH, shuffle=False)
    loaders = {"shards_torch": build_loader(embedded, backend="torch", **kw)}
    if dali_available():
        loaders["shards_dali"] = build_loader(embedded, backend="dali", **kw)
    loaders["geotiff"] = _baseline(loaders["shards_torch"])
    n = len(loaders["shards_torch"].assembler.schedule.ids)
    _measure(
        report, "embedded_plain", loaders, n, {"samples": n, "batch": BATCH, "tile": 24, "hr": 192}
    )


def test_loader_vs_geotiff_views(report, embedded):
    kw = dict(split=None, batch_size=BATCH, views=True, view_config={"crop": 16}, seed=1)
    loaders = {"shards_torch": build_loader(embedded, backend="torch", **kw)}
    loaders["geotiff"] = _baseline(loaders["shards_torch"])
    n = len(loaders["shards_torch"].assembler.schedule) * BATCH
    _measure(
        report,
        "embedded_views",
        loaders,
        n,
        {"samples": n, "batch": BATCH, "crop": 16, "hr_crop": 128},
    )


def test_loader_vs_geotiff_bigearthnet(report, tmp_path_factory):
    if QUICK:
        pytest.skip("quick mode: the embedded sample only")
    shared = Path(
        os.environ.get(
            "SKYSENSE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
        )
    )
    if not (shared / "bigearthnet").is_dir():
        pytest.skip(f"{shared}/bigearthnet not found")
    rep = ingest(
        shared / "bigearthnet",
        tmp_path_factory.mktemp("ben"),
        IngestConfig(tile_size=120),
        progress=False,
    )
    loaders = {"shards_torch": build_loader(rep.manifest, None, 2, "torch", shuffle=False)}
    loaders["geotiff"] = _baseline(loaders["shards_torch"])
    _measure(report, "bigearthnet_plain", loaders, 6, {"samples": 6, "batch": 2, "tile": 120})


# ------------------------------------------------------------------ ingest memory over place size

RSS_SIZES = (1000, 2000, 4000) if QUICK else (2000, 8000, 32000)
# VmHWM, not getrusage's ru_maxrss: the latter is inherited from the parent across fork and exec
# (this pytest process, torch loaded, would set the floor of every child's figure).
RSS_CODE = """
import sys
from skysense.data.ingest import IngestConfig, ingest
rep = ingest(sys.argv[1], sys.argv[2], IngestConfig(tile_size=64), progress=False)
assert rep.n_samples > 0 and not rep.bad_files, rep.format()
print("SAMPLES", rep.n_samples)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print("MAXRSS_KB", hwm.split()[1])
"""


def sparse_place(path: Path, n: int, patch: int = 512) -> Path:
    """An ``n`` x ``n`` Sentinel-1 place (VV/VH float32 dB, 10 m, UTM), tiled 512 x 512 and
    sparse: four ``patch``-pixel squares hold data, every other block is absent from the file
    (nodata NaN), so the file is a few MB at any size while the place it describes is
    ``n`` x ``n`` pixels: the same data tiles, ever more empty ground."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff", width=n, height=n, count=2, dtype="float32", crs="EPSG:32633",
        transform=Affine(10, 0, 404_400.0, 0, -10, 5_342_400.0), nodata=float("nan"),
        tiled=True, blockxsize=512, blockysize=512, compress="deflate", SPARSE_OK=True,
    )  # fmt: skip
    ramp = np.linspace(-12, -8, patch * patch, dtype=np.float32).reshape(patch, patch)
    with rasterio.open(path, "w", **profile) as ds:
        ds.set_band_description(1, "VV")
        ds.set_band_description(2, "VH")
        ds.update_tags(ACQUISITION_DATE="2017-06-13")
        for fy in (0.2, 0.6):
            for fx in (0.2, 0.6):
                r, c = int(n * fy) // 512 * 512, int(n * fx) // 512 * 512
                win = rasterio.windows.Window(c, r, min(patch, n - c), min(patch, n - r))
                ds.write(np.stack([ramp, ramp - 7.0])[:, : win.height, : win.width], window=win)
    return path


def _ingest_peak(src: Path, dst: Path) -> tuple[int, int]:
    """(peak RSS in bytes, samples) of one ingest in a fresh interpreter."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", RSS_CODE, str(src), str(dst)],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout  # fmt: skip
    vals = dict(line.split() for line in out.splitlines() if line.split()[0].isupper())
    return int(vals["MAXRSS_KB"]) * 1024, int(vals["SAMPLES"])


def test_ingest_peak_rss_over_place_size(report, tmp_path):
    """Peak RSS of a whole ingest (a fresh process each) for places of growing size: memory is
    bounded by construction (blocks of whole tiles, tiles spilled to disk, a small GDAL block
    cache), so the peak stays flat while the place grows 256-fold in area."""
    peaks = {}
    for n in RSS_SIZES:
        src = tmp_path / f"src{n}"
        sparse_place(src / "place" / "S1A_IW_GRDH_20170613_db.tif", n)
        peak, samples = _ingest_peak(src, tmp_path / f"dst{n}")
        peaks[n] = peak
        report.add(
            GROUP, "ingest_peak_rss_mib", peak / 2**20, "MiB", kind="scaling",
            params={"sweep": "place_px", "place_px": n, "samples": samples},
            note="whole process (interpreter, numpy, GDAL included), one fresh process per size",
        )  # fmt: skip
        print(f"\ningest {n} x {n} place: peak RSS {peak / 2**20:.0f} MiB, {samples} samples")
    small, large = RSS_SIZES[0], RSS_SIZES[-1]
    flat = peaks[small] / peaks[large]
    report.add(
        GROUP, "ingest_peak_rss_flatness", peaks[large] / 2**20, "MiB",
        baseline=peaks[small] / 2**20,
        baseline_name=f"peak RSS of the same ingest on a {small} x {small} place",
        ratio=flat,
        params={"small_px": small, "large_px": large},
        note=f"peak RSS at {large} x {large} px beside {small} x {small} px; goal: flat within "
        "20 % (ratio >= 0.83); main before issue 13: 755 MB at 2000^2, 2.47 GB at 4000^2",
    )  # fmt: skip
    assert flat >= 1 / 1.2, f"peak RSS not flat: {peaks}"


# --------------------------------------------- shards at scale: compression, decoding, Dask ingest
# Issue 20. Real samples from ../shared/data (skipped where absent): the OSCD cities (Sentinel-2
# L1C), the USGS aerial RGB tiles (HR) and BigEarthNet (Sentinel-1 + Sentinel-2).

SHARED = Path(
    os.environ.get("SKYSENSE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
OSCD_CITIES = 3 if QUICK else 10
SCALE_SOURCES = {
    # name: (folder under ../shared/data, ingest settings)
    "oscd_s2": ("oscd/images", {}),
    "usgs_hr": ("hr_rgb/usgs_rsvqa_hr", {}),
    "bigearthnet_s2_s1": ("bigearthnet", {"tile_size": 120}),
}


def _scale_source(name: str, tmp: Path) -> tuple[Path, dict]:
    sub, cfg = SCALE_SOURCES[name]
    src = SHARED / sub
    if not src.is_dir():
        pytest.skip(f"{src} not found (../shared/data)")
    if name == "oscd_s2" and OSCD_CITIES < 10:
        link = tmp / "oscd_subset"
        link.mkdir(exist_ok=True)
        for city in sorted(p for p in src.iterdir() if p.is_dir())[:OSCD_CITIES]:
            if not (link / city.name).exists():  # a copy: discovery does not follow links
                shutil.copytree(city, link / city.name)
        src = link
    return src, cfg


def _tree_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


@pytest.fixture(scope="module")
def scale_ingests(tmp_path_factory):
    """{source: (src, {format: manifest path}, samples)}: raw and compressed ingests."""
    out = {}
    tmp = tmp_path_factory.mktemp("scale")
    for name in SCALE_SOURCES:
        sub, cfg = SCALE_SOURCES[name]
        if not (SHARED / sub).is_dir():
            continue
        src, cfg = _scale_source(name, tmp)
        dsts = {}
        for fmt in ("raw", "compressed"):
            rep = ingest(src, tmp / f"{name}-{fmt}", progress=False, shard_format=fmt, **cfg)
            assert rep.ok, rep.format()
            dsts[fmt] = rep.manifest
        out[name] = (src, dsts, rep.n_samples)
    if not out:
        pytest.skip(f"no shared sample under {SHARED}")
    return out


def test_bytes_per_sample_compressed_raw_geotiff(report, scale_ingests):
    """Shard bytes per sample (every file of the shards: pixels, masks, dates) of compressed
    and raw shards, beside the source GeoTIFFs' bytes per sample."""
    from skysense.data.io import is_raster

    for name, (src, dsts, n) in scale_ingests.items():
        raw = _tree_bytes(dsts["raw"].parent / "shards") / n
        comp = _tree_bytes(dsts["compressed"].parent / "shards") / n
        tif = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and is_raster(p)) / n
        params = {"source": name, "samples": n}
        report.add(
            GROUP, "compressed_shard_bytes_per_sample", comp, "bytes", baseline=raw,
            baseline_name="raw shards (uint16/uint8/float32 .npy) of the same ingest",
            ratio=raw / comp, params=params,
            note="HR JPEG q90 (lossy), S2 16-bit PNG, S1 byte-shuffled deflate (lossless)",
        )  # fmt: skip
        report.add(
            GROUP, "raw_shard_bytes_per_sample", raw, "bytes", baseline=tif,
            baseline_name="source GeoTIFFs (as distributed, often compressed) per sample",
            ratio=tif / raw, params=params,
            note="< 1: raw shards are uncompressed, aligned to 10 m (20/60 m bands upsampled), "
            "with masks; sources hold native resolutions and may be compressed",
        )  # fmt: skip
        print(f"\n{name}: {n} samples, bytes/sample: GeoTIFF {tif:.0f}, raw {raw:.0f}, "
              f"compressed {comp:.0f}")  # fmt: skip


def test_decode_samples_per_s_dali_torch_memmap(report, scale_ingests):
    """Whole samples (every step, every band) out of the shards: DALI's image decoder and the
    torch backend's Pillow decoder on compressed shards, beside slicing the raw memory map."""
    for name, m in (("oscd_s2", "s2"), ("usgs_hr", "hr")):
        if name in scale_ingests:
            _, dsts, n = scale_ingests[name]
            _decode_figures(report, name, m, dsts, n)


def _decode_figures(report, name: str, m: str, dsts: dict, n: int) -> None:
    from skysense.data.manifest import Manifest
    from skysense.data.shards import ShardReader

    raw_r = ShardReader(Manifest(dsts["raw"]))
    enc_r = ShardReader(Manifest(dsts["compressed"]))
    shards = sorted(Manifest(dsts["raw"]).shards)

    def memmap():
        for s in shards:
            a = raw_r.arrays(s)[m]
            for i in range(len(a)):
                np.array(a[i])

    def pillow():
        for s in shards:
            a = enc_r.arrays(s)[m]
            for i in range(len(a)):
                a[i]

    fns = {"memmap": memmap, "torch": pillow}
    if dali_available():
        from skysense.data.dali_decode import decode_batch

        def dali():
            for s in shards:
                a = enc_r.arrays(s)[m]
                decode_batch([a.encoded(i) for i in range(len(a))], a.codec, a.shape[1:])

        fns["dali"] = dali
    # Rounds until the fastest (the memory map) has run 1 s in all, at most 60: a 98-sample JPEG
    # epoch takes 40 ms, and 3 rounds let the DALI ratio read 1.12 one run and 1.69 the next.
    t = compare(fns, repeat=1 if QUICK else 3, warmup=1, min_time=0 if QUICK else 1.0)
    codec = enc_r.arrays(0)[m].codec
    params = {"source": name, "modality": m, "codec": codec, "samples": n}
    report.add(
        GROUP, "decode_torch_samples_per_s", n / t["torch"], "samples/s",
        baseline=n / t["memmap"], baseline_name="raw shards: memory-map slice, no decoding",
        ratio=t["memmap"] / t["torch"], params=params,
        note="< 1 expected: decoding costs what a memory map does not (Pillow, one thread)",
        spread=t.spread("torch", "memmap"),
    )  # fmt: skip
    if "dali" in t:
        report.add(
            GROUP, "decode_dali_samples_per_s", n / t["dali"], "samples/s",
            baseline=n / t["torch"], baseline_name="torch backend: Pillow decode per sample",
            ratio=t["torch"] / t["dali"], params={**params, "dali_device": "cpu"},
            note="DALI fn.decoders.image on the CPU, one thread, batches of a shard",
            spread=t.spread("dali", "torch"),
        )  # fmt: skip
    print(f"\n{name} {m} ({codec}): samples/s memmap {n / t['memmap']:.0f}, "
          + ", ".join(f"{k} {n / v:.0f}" for k, v in t.items() if k != "memmap"))  # fmt: skip


def test_ingest_places_per_s_one_vs_two_dask_workers(report, tmp_path):
    """OSCD cities ingested on a LocalCluster of 1 and of 2 workers (clusters started before
    the clock: only the ingest is timed)."""
    distributed = pytest.importorskip("distributed", reason="skysense-data[scale] not installed")
    src, _ = _scale_source("oscd_s2", tmp_path)
    clusters = {
        k: distributed.LocalCluster(
            n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None
        )
        for k in (1, 2)
    }
    runs = iter(range(100))
    try:

        def run(k):
            def f():
                dst = tmp_path / f"dst{k}-{next(runs)}"
                rep = ingest(src, dst, progress=False, cluster=clusters[k].scheduler_address)
                assert rep.ok
                return rep

            return f

        # full mode: one unmeasured round first (workers import rasterio etc. on first use)
        t = compare({1: run(1), 2: run(2)}, repeat=1 if QUICK else 2, warmup=0 if QUICK else 1)
    finally:
        for c in clusters.values():
            c.close()
    places = OSCD_CITIES
    report.add(
        GROUP, "ingest_dask_2_workers_places_per_s", places / t[2], "places/s",
        baseline=places / t[1], baseline_name="the same ingest on a 1-worker LocalCluster",
        ratio=t[1] / t[2], params={"source": "oscd_s2", "places": places},
        note=f"{os.cpu_count()} CPU cores shared with other processes: 2 workers cannot reach "
        "2x here; shards are written by workers, the manifest by the client",
    )  # fmt: skip
    print(f"\ningest {places} OSCD places: 1 worker {t[1]:.1f} s, 2 workers {t[2]:.1f} s")


def test_loader_views_on_compressed_vs_raw_shards(report, scale_ingests):
    """Pre-training views (the whole loader: decode, crops, flips, normalisation, collation) of
    the OSCD series and the USGS HR tiles, compressed beside raw, per backend: what decoding
    costs the loader (DALI decodes only each HR crop's region, inside its pipeline)."""
    for name, crop in (("oscd_s2", 32), ("usgs_hr", 128)):
        if name in scale_ingests:
            _views_figures(report, name, crop, scale_ingests[name][1])


def _views_figures(report, name: str, crop: int, dsts: dict) -> None:
    kw = dict(split=None, batch_size=BATCH, views=True, view_config={"crop": crop}, seed=3)
    backends = ["torch"] + (["dali"] if dali_available() else [])
    for backend in backends:
        loaders = {fmt: build_loader(dsts[fmt], backend=backend, **kw) for fmt in dsts}
        n = len(loaders["raw"].assembler.schedule) * BATCH
        first = {fmt: next(iter(lo)) for fmt, lo in loaders.items()}  # warm-up
        if name == "oscd_s2":  # lossless: the batches are equal
            _assert_same(first["compressed"], first["raw"])
        epochs = {k: (lambda lo=lo: sum(1 for _ in lo)) for k, lo in loaders.items()}
        t = compare(epochs, repeat=1, warmup=0)
        report.add(
            GROUP, "views_compressed_shards_samples_per_s", n / t["compressed"], "samples/s",
            baseline=n / t["raw"], baseline_name="the same views from raw shards",
            ratio=t["raw"] / t["compressed"],
            params={"source": name, "backend": backend, "crop": crop, "samples": n},
            note="< 1 expected: decoding costs what a memory map does not (S2 16-bit PNG "
            "decoded whole before the crop; HR JPEG q90, its crop's region only with DALI)",
        )  # fmt: skip
        print(f"\n{name} views {backend}: raw {n / t['raw']:.0f} samples/s, compressed "
              f"{n / t['compressed']:.0f} samples/s")  # fmt: skip

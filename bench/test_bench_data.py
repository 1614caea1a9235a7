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
"""

from __future__ import annotations

import json
import os
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
    t = compare(epochs, repeat=1 if QUICK else 3, warmup=0)
    for key in loaders:
        if key == "geotiff":
            continue
        report.add(
            GROUP, f"{name}_{key}_samples_per_s", n_samples / t[key], "samples/s",
            baseline=n_samples / t["geotiff"],
            baseline_name="rasterio per sample from the GeoTIFFs (TorchGeo style), same batches",
            ratio=t["geotiff"] / t[key], params={**params, "backend": key},
            note=note or "acceptance: ratio >= 5 (batch contents checked equal first)",
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

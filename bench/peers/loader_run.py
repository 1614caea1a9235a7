"""One loader measurement in a fresh process: this project's loader over its shards, or
TorchGeo's datasets and samplers over the source GeoTIFFs of the same samples.

Run by bench/test_bench_peers.py (ours with the project's .venv, TorchGeo with .venv-peers):

    python loader_run.py CONFIG.json

CONFIG: ``side`` ("ours" | "torchgeo"), ``sampler`` ("grid" | "random"), ``manifest`` (ours),
``raw`` (the GeoTIFF folder, TorchGeo), ``tile`` (Sentinel px), ``stride`` (px between places,
grid), ``crop`` (random), ``batch`` (samples per batch), ``samples`` (per epoch), ``epochs``
(timed, after one untimed), ``dump`` (optional .npz: the first ``dump_batches`` batches' pixels,
for the check), ``dataset`` ("embedded" or "bigearthnet": TorchGeo's classes for its layout).

Prints one JSON line: wall and CPU seconds (process time) per timed epoch, the resident peak's
rise over the whole run after the imports (building the dataset, every epoch: MiB), the samples
per epoch, versions.

TorchGeo side, as its 0.10 documentation has it: RasterDataset subclasses per file layout
(stacks and per-band files of S2, stacks and per-polarisation files of S1, joined by ``|``),
``time_series=True`` (every date of a place stacked [T, C, H, W]), intersected S2 with S1 by
``IntersectionDataset(s2, s1, spatial_only=True)`` (``s2 & s1`` intersects in time too, and an
S1 date never equals an S2 date: "no temporal intersection"), with a collate that keeps the two
modalities apart (the default concatenates channels, which differ), a sample transform that pads
the time axis to the data set's longest series (``stack_samples`` stacks, so ragged series
cannot batch), ``GriddedPatchSampler`` (``size`` = the tile, ``stride`` = the places' spacing:
one chip per place) or ``RandomPatchSampler`` (0.10's successors of the deprecated
GridGeoSampler / RandomGeoSampler, whose chips carry one file's date each: a time series would
be read once per date), ``DataLoader(..., collate_fn=stack_samples)``.
"""

from __future__ import annotations

import json
import sys
import time


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _torchgeo(cfg):
    import importlib.metadata as md
    import re

    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import IntersectionDataset, RasterDataset, stack_samples
    from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler

    s2_bands = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

    class S2Stack(RasterDataset):
        filename_glob = "S2*_MSIL2A_*.tif"
        filename_regex = r"^S2[AB]_MSIL2A_(?P<date>\d{8})T\d{6}\.tif$"
        all_bands = s2_bands

    class S2Bands(RasterDataset):
        filename_glob = "S2*_MSIL2A_*_B02.tif"
        filename_regex = r"^S2[AB]_MSIL2A_(?P<date>\d{8})T\d{6}_(?P<band>B[0-9][0-9A])\.tif$"
        separate_files = True
        all_bands = s2_bands

    class S1Stack(RasterDataset):
        filename_glob = "S1*_IW_GRDH_*_db.tif"
        filename_regex = r"^S1[AB]_IW_GRDH_(?P<date>\d{8})T\d{6}_db\.tif$"
        all_bands = ("VV", "VH")

    class S1Pols(RasterDataset):
        filename_glob = "S1*_IW_GRDH_*_VV_db.tif"
        filename_regex = r"^S1[AB]_IW_GRDH_(?P<date>\d{8})T\d{6}_(?P<band>VV|VH)_db\.tif$"
        separate_files = True
        all_bands = ("VV", "VH")

    def layouts(*classes):
        out = []
        for c in classes:
            try:
                out.append(c(cfg["raw"], res=10.0, time_series=True))
            except Exception as e:  # noqa: BLE001 - DatasetNotFoundError: no file of this layout
                if type(e).__name__ != "DatasetNotFoundError":
                    raise
        ds = out[0]
        for d in out[1:]:
            ds = ds | d
        return ds

    s2, s1 = layouts(S2Stack, S2Bands), layouts(S1Stack, S1Pols)

    def longest(ds):
        idx = ds.index
        return int(idx.groupby(idx.geometry.to_wkt()).size().max())

    t_max = {"s2": longest(s2), "s1": longest(s1)}

    def keep_apart(samples):
        return {
            "s2": samples[0]["image"],
            "s1": samples[1]["image"],
            "bounds": samples[0]["bounds"],
        }

    def pad_time(sample):
        for m in ("s2", "s1"):
            x = sample[m]
            sample[m + "_valid"] = torch.arange(t_max[m]) < x.shape[0]
            sample[m] = torch.cat([x, x.new_zeros((t_max[m] - x.shape[0], *x.shape[1:]))])
        return sample

    ds = IntersectionDataset(s2, s1, spatial_only=True, collate_fn=keep_apart, transforms=pad_time)
    if cfg["sampler"] == "grid":
        sampler = GriddedPatchSampler(ds, size=cfg["tile"], stride=cfg["stride"])
    else:
        sampler = RandomPatchSampler(
            ds, size=cfg["crop"], length=cfg["samples"], generator=cfg.get("seed", 0)
        )
    loader = DataLoader(ds, batch_size=cfg["batch"], sampler=sampler, collate_fn=stack_samples)
    versions = {"torchgeo": md.version("torchgeo")}

    def dump_first(batch):
        # The chips' files, in the order their dates were stacked (the index's order).
        files = []
        for b in batch["bounds"]:
            x0, x1, y0, y1 = float(b[0]), float(b[1]), float(b[3]), float(b[4])
            for d in (s2, s1):
                hit = d.index.cx[x0 + 1 : x1 - 1, y0 + 1 : y1 - 1]
                files.append([re.search(r"_(\d{8})T", p).group(1) for p in hit.filepath])
        return {"dates": files}

    return loader, versions, dump_first


def _torchgeo_bigearthnet(cfg):
    """BigEarthNet's per-band S2 and per-polarisation S1 patches. They lie in several UTM zones;
    one dataset per zone keeps every patch in its own CRS (one dataset would warp every file to
    the first file's CRS), and each patch is one chip: GriddedPatchSampler over its footprint."""
    import glob
    import importlib.metadata as md
    from collections import defaultdict

    import rasterio
    from torch.utils.data import DataLoader
    from torchgeo.datasets import IntersectionDataset, RasterDataset, stack_samples
    from torchgeo.samplers import GriddedPatchSampler

    class BenS2(RasterDataset):
        filename_glob = "S2*_B02.tif"
        filename_regex = r"^S2[AB]_MSIL2A_(?P<date>\d{8})T\d+_\d+_\d+_(?P<band>B[0-9][0-9A])\.tif$"
        separate_files = True
        all_bands = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

    class BenS1(RasterDataset):
        filename_glob = "S1*_VV.tif"
        filename_regex = r"^S1[AB]_IW_GRDH_1SDV_(?P<date>\d{8})T\d+_\w+?_(?P<band>VV|VH)\.tif$"
        separate_files = True
        all_bands = ("VV", "VH")

    zones = defaultdict(lambda: {"s2": [], "s1": []})
    for m, pattern in (("s2", "S2*_B02.tif"), ("s1", "S1*_VV.tif")):
        for f in sorted(glob.glob(f"{cfg['raw']}/**/{pattern}", recursive=True)):
            with rasterio.open(f) as src:
                zones[src.crs.to_string()][m].append(f)

    def keep_apart(samples):
        return {
            "s2": samples[0]["image"],
            "s1": samples[1]["image"],
            "bounds": samples[0]["bounds"],
        }

    loaders = []
    for files in zones.values():
        s2 = BenS2(files["s2"], res=10.0, time_series=True)
        s1 = BenS1(files["s1"], res=10.0, time_series=True)
        ds = IntersectionDataset(s2, s1, spatial_only=True, collate_fn=keep_apart)
        chips = [
            c for g in s2.index.geometry for c in GriddedPatchSampler(ds, size=cfg["tile"], roi=g)
        ]
        loaders.append(
            DataLoader(ds, batch_size=cfg["batch"], sampler=chips, collate_fn=stack_samples)
        )

    class Zones:
        def __iter__(self):
            for lo in loaders:
                yield from lo

    return Zones(), {"torchgeo": md.version("torchgeo")}, lambda batch: {"dates": []}


def _ours(cfg):
    from skysense.data.loader import build_loader

    kw = dict(split=None, batch_size=cfg["batch"], backend="torch", modalities=("s2", "s1"))
    if cfg["sampler"] == "grid":
        loader = build_loader(cfg["manifest"], shuffle=False, **kw)
    else:
        view = {
            "crop": cfg["crop"], "hflip": 0.0, "vflip": 0.0, "rot90": False,
            "date_jitter_days": 0, "max_steps": {"s2": None, "s1": None}, "min_overlap": 0.0,
        }  # fmt: skip
        loader = build_loader(
            cfg["manifest"], views=True, view_config=view, shuffle=True, seed=cfg.get("seed", 0),
            drop_last=False, **kw,
        )  # fmt: skip
    return loader, {}, lambda batch: {}


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    import numpy as np
    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    # The libraries are imported before the measure (both sides): their import is not the loader.
    if cfg["side"] == "torchgeo":
        import torchgeo.datasets
        import torchgeo.samplers  # noqa: F401
    else:
        import skysense.data.loader  # noqa: F401
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if cfg["side"] == "ours":
        make = _ours
    else:
        make = _torchgeo_bigearthnet if cfg.get("dataset") == "bigearthnet" else _torchgeo
    loader, v, dump_first = make(cfg)
    versions.update(v)
    build = time.perf_counter() - t0
    first, n = [], 0
    for batch in loader:  # the untimed epoch: file handles opened, caches warm
        if len(first) < cfg.get("dump_batches", 1):
            first.append(batch)
        n += len(batch["s2"]) if "view1" not in batch else 2 * len(batch["view1"]["s2"])
    times, cpu = [], []
    for _ in range(cfg["epochs"]):
        t, c = time.perf_counter(), time.process_time()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rise = _status("VmHWM") - before
    if cfg.get("dump"):
        first = {k: torch.cat([b[k] for b in first]) for k in first[0]}
        flat = first if "view1" not in first else {
            f"{v}.{k}": x for v in first for k, x in first[v].items()
        }  # fmt: skip
        arrays = {k: x.numpy() for k, x in flat.items() if isinstance(x, torch.Tensor)}
        np.savez(cfg["dump"], **arrays, meta=json.dumps(dump_first(first)))
    print(
        "RESULT "
        + json.dumps(
            {
                "side": cfg["side"],
                "epoch_seconds": times,
                "epoch_cpu_seconds": cpu,
                "build_seconds": build,
                "samples": n,
                "rss_rise_mib": rise,
                "versions": versions,
            }
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()

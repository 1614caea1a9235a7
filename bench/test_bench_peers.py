"""Peers side by side: TorchGeo's loader and TerraTorch's tiled inference, run in the same
session as this project's loader and `skysense infer`, on the same files.

The peers live in environments of their own (bench/peers/setup.sh, run by ``make bench``:
torchgeo 0.10 needs Python >= 3.12, the project's .venv is 3.11; terratorch 1.2.13 pins
torchgeo < 0.10, so it has a second one with the torchgeo it pins). Every measurement is a
fresh process (bench/peers/loader_run.py, bench/peers/infer_run.py), ours and the peer's
interleaved round by round (ours, peer, ours, peer ...), so neither inherits the other's
allocator or page cache state and a burst of load on this shared machine falls on both.
Where a peer's environment is missing, each of its figures is reported as "peer absent" with
the reason (benchlib.report_absent), never skipped silently.

Figures (ratio > 1: this project better):

- data: samples/s and the resident peak's rise of TorchGeo 0.10 (RasterDataset subclasses over
  the embedded sample's S2 and S1 GeoTIFFs, S2 intersected with S1, GriddedPatchSampler /
  RandomPatchSampler, DataLoader with stack_samples; see loader_run.py) against build_loader over
  the shards ingested from the same files, at the same batch size and tile: whole 24 px tiles,
  one per place, every date (grid); random 16 px crops, every date (random). The grid batches
  are checked to hold the same pixels (each TorchGeo chip matched to its place by its bounds and
  each step by its date: S2 within 1 DN, S1 within 1e-4 dB) before anything is timed. Full
  mode adds BigEarthNet's six S2 + S1 patches from ../shared/data (three UTM zones: a TorchGeo
  dataset per zone, one 120 px chip per patch), pixels checked likewise.
- downstream: windows/s and the resident peak's rise of TerraTorch's ``tiled_inference`` over
  this project's tiny segmentation model (same network, same softmax) against ``skysense infer``
  on generated 1536^2, 4096^2 and 8192^2 scenes (quick: 256^2), window 128, overlap 16, batches
  of 8; the two class maps are checked to agree on >= 95 % of the pixels (the blend weights
  differ in the overlaps).

Speed ratios are CPU-time ratios (wall clock in the note): wall time moved past the guard's
tolerance with the other core busy, CPU time did not (bench/README.md, "Peers", has the numbers).
Each speed figure also records the round-to-round spread ((max - min) / median of the per-round
ratios) of both clocks as "info" figures: the measured noise the guard's tolerance has to cover.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from benchlib import (
    MIB,
    QUICK,
    mem_note,
    mem_ratio,
    peer_python,
    report_absent,
    spread,
    tiny_segmentation_file,
)

BENCH = Path(__file__).resolve().parent
SIDES_OF = {"ours": "ours", "peer": "torchgeo"}
PEERS = BENCH / "peers"

BATCH = 4 if QUICK else 8
TILE, CROP = 24, 16  # the embedded sample's tile; the random crop (16 px: TorchGeo's random
# sampler keeps a chip's half-diagonal inside the data, which leaves no room for a 24 px chip)
SPACING = 200  # px between neighbouring places of the embedded sample (2000 m at 10 m)
LOADER_ROUNDS = {"grid": 1 if QUICK else 2, "random": 1}
# $SKYSENSE_BENCH_PEER_ROUNDS: interleaved rounds of every peer figure (0: the defaults here)
PEER_ROUNDS = int(os.environ.get("SKYSENSE_BENCH_PEER_ROUNDS", "0"))
SIDES = (256,) if QUICK else (1536, 4096, 8192)
WINDOW, OVERLAP, INFER_BATCH = 128, 16, 8


def _ours_python() -> str:
    import sys

    return sys.executable


def _run(python: str, script: Path, *args, timeout: float = 900) -> dict:
    """Run a measuring script in a fresh process; its ``RESULT {json}`` line."""
    r = subprocess.run(
        [python, str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(
            f"{script.name} {args[:1]} exited {r.returncode}: {r.stderr.strip()[-1500:]}"
        )
    return json.loads(line[len("RESULT ") :])


def _peer_label(versions: dict, peer: str) -> str:
    other = {"torchgeo": "terratorch", "terratorch": "torchgeo"}[peer]
    extra = f", {other} {versions[other]}" if other in versions else ""
    return f"{peer} {versions[peer]}{extra}, Python {versions['python']}"


def _speed_figures(report, group, name, unit, count, wall, cpu, params, baseline_name, note):
    """The guarded speed figure of ``count`` items from per-round seconds ``wall[side]`` and
    ``cpu[side]`` (sides "ours", "peer"), and the per-round spreads of both clocks as "info".

    The guarded ratio is the CPU-time ratio (process time of each run, all its threads): on this
    shared machine other processes stretch wall time by whatever share of a core they take while
    a run waits (measured: see bench/README.md, "Peers"), which CPU time does not count; both
    sides here are single-threaded, so on a quiet machine the two clocks agree. The wall-clock
    rates and ratio are in the note."""
    med = {k: {s: float(np.median(v[s])) for s in v} for k, v in (("wall", wall), ("cpu", cpu))}
    rounds = {
        k: [p / o for o, p in zip(v["ours"], v["peer"])] for k, v in (("wall", wall), ("cpu", cpu))
    }
    report.add(
        group,
        name,
        count / med["cpu"]["ours"],
        unit + " (CPU)",
        baseline=count / med["cpu"]["peer"],
        baseline_name=baseline_name,
        ratio=med["cpu"]["peer"] / med["cpu"]["ours"],
        params=params,
        note=f"{note}; wall clock: ours {count / med['wall']['ours']:.3g}, peer "
        f"{count / med['wall']['peer']:.3g} {unit}, ratio "
        f"{med['wall']['peer'] / med['wall']['ours']:.3g}; "
        f"{len(rounds['cpu'])} interleaved round(s) in fresh processes, per-round ratios "
        f"CPU {', '.join(f'{x:.3g}' for x in rounds['cpu'])}, "
        f"wall {', '.join(f'{x:.3g}' for x in rounds['wall'])}",
    )
    if len(rounds["cpu"]) > 1:
        for k in ("cpu", "wall"):
            report.add(
                group,
                f"{name}: round-to-round spread, {k} clock",
                spread(rounds[k]),
                "",
                kind="info",
                params=params,
                note="(max - min) / median of the per-round ratios",
            )


# ----------------------------------------------------------------------------------------------
# Loader: TorchGeo 0.10 against build_loader
# ----------------------------------------------------------------------------------------------


def _write_cfg(tmp: Path, cfg: dict) -> Path:
    path = tmp / f"{cfg['side']}-{cfg['sampler']}.json"
    path.write_text(json.dumps(cfg))
    return path


def _check_same_pixels(manifest: Path, dump: Path) -> int:
    """Every chip TorchGeo dumped against our loader's sample of the same place: the same dates,
    the same pixels where ours marks them valid. Returns the number of chips checked."""
    from skysense.data.assemble import band_normalisation
    from skysense.data.loader import build_loader
    from skysense.data.manifest import Manifest

    man = Manifest(Path(manifest))
    a = np.load(dump)
    dates = json.loads(str(a["meta"]))["dates"]
    origin = {}
    for g, t in man.query("SELECT grp, transform FROM groups"):
        t = json.loads(t)
        origin[(round(t[2]), round(t[5]))] = g
    sid_of = {g: sid for sid, g in man.query("SELECT id, grp FROM samples")}
    lo = build_loader(manifest, None, 1024, "torch", shuffle=False, modalities=("s2", "s1"))
    ours = next(iter(lo))
    row = {int(s): i for i, s in enumerate(ours["sample_id"])}
    # S2 within 1 DN: the 20 m bands of per-band files, resampled to 10 m by each side (the 10 m
    # bands agree exactly), plus the float32 rounding of our normalisation undone (measured up
    # to 1.0001); S1 within that rounding.
    tol = {"s2": 1.01, "s1": 1e-4}
    for j, b in enumerate(a["bounds"]):
        # bounds: [xmin, xmax, xres, ymin, ymax, yres, tmin, tmax, tres]; a place by its corner
        g = origin[(round(float(b[0])), round(float(b[4])))]
        i = row[sid_of[g]]
        for k, m in enumerate(("s2", "s1")):
            mean, std = (
                torch.as_tensor(v)[:, None, None] for v in band_normalisation(man, m, "spec")
            )
            ours_doy = ours[m + "_doy"][i].tolist()
            usable = ours[m + "_doy"][i][ours[m + "_valid"][i]].tolist()
            if dates:  # the steps TorchGeo stacked, by the dates of their files
                doys = [
                    dt.date(int(d[:4]), int(d[4:6]), int(d[6:])).timetuple().tm_yday
                    for d in dates[2 * j + k]
                ]
                assert set(usable) <= set(doys), f"{g} {m}: dates {usable} vs TorchGeo {doys}"
                pairs = [(t, ours_doy.index(d)) for t, d in enumerate(doys) if d in usable]
            else:  # one date per place (BigEarthNet)
                pairs = [(0, 0)]
            for t, s in pairs:
                valid = ours[m + "_pixel_valid"][i, s]
                x = ours[m][i, s] * std + mean
                diff = (x - torch.as_tensor(a[m][j, t])).abs()[:, valid]
                assert diff.numel() > 0, f"{g} {m}: no valid pixel to compare"
                assert float(diff.max()) <= tol[m], (
                    f"{g} {m} step {s}: max |ours - TorchGeo| = {float(diff.max())}"
                )
    return len(a["bounds"])


def _measure_loader(report, name, unit, params, cfg, rounds, tmp, check_chips=0):
    """Interleaved rounds of ours and TorchGeo (``cfg``: loader_run.py's settings, ``ours`` and
    ``torchgeo`` entries overriding it per side); figures: speed, resident peak, spread."""
    res = {"ours": [], "torchgeo": []}
    pys = {"ours": _ours_python(), "torchgeo": peer_python("torchgeo")[0]}
    dump = tmp / "torchgeo-chips.npz"
    for r in range(rounds):
        for side in ("ours", "torchgeo"):
            c = {k: v for k, v in cfg.items() if k not in res} | cfg.get(side, {}) | {"side": side}
            if side == "torchgeo" and r == 0 and check_chips:
                c["dump"] = str(dump)
            res[side].append(_run(pys[side], PEERS / "loader_run.py", _write_cfg(tmp, c)))
        assert res["ours"][-1]["samples"] == res["torchgeo"][-1]["samples"]
        if r == 0 and check_chips:
            assert _check_same_pixels(Path(cfg["manifest"]), dump) == check_chips
    count = res["ours"][0]["samples"]
    label = _peer_label(res["torchgeo"][0]["versions"], "torchgeo")
    clocks = {
        k: {s: [float(np.median(x[key])) for x in res[side]] for s, side in SIDES_OF.items()}
        for k, key in (("wall", "epoch_seconds"), ("cpu", "epoch_cpu_seconds"))
    }
    _speed_figures(
        report, "data", f"{name}_{unit.split('/')[0]}_per_s", unit, count, clocks["wall"],
        clocks["cpu"], params, f"TorchGeo ({label}): {cfg['what_peer']}",
        f"ours: {cfg['what_ours']}"
        + ("; batches checked first: same places, dates and pixels" if check_chips else ""),
    )  # fmt: skip
    rss_o = float(np.median([x["rss_rise_mib"] for x in res["ours"]])) * MIB
    rss_p = float(np.median([x["rss_rise_mib"] for x in res["torchgeo"]])) * MIB
    report.add(
        "data",
        f"{name}_peak_rss",
        rss_o / MIB,
        "MiB",
        baseline=rss_p / MIB,
        baseline_name=f"TorchGeo ({label})",
        ratio=mem_ratio(rss_p, rss_o),
        params=params,
        note=mem_note(
            rss_p,
            rss_o,
            "rise of the resident peak over the whole run after the imports (building the "
            "dataset or opening the manifest, every epoch)",
        ),
    )


@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_loader_vs_torchgeo(report, embedded, tmp_path, sampler):
    from skysense.data.manifest import Manifest

    n = len(Manifest(Path(embedded)).split_ids(None))
    unit = "samples/s" if sampler == "grid" else "crops/s"
    name = f"embedded_s2s1_{sampler}_vs_torchgeo"
    params = {"samples": n, "batch": BATCH, "tile": TILE if sampler == "grid" else CROP}
    peer_py, why = peer_python("torchgeo")
    if peer_py is None:
        report_absent(report, "data", f"{name}_{unit.split('/')[0]}_per_s", why, params)
        report_absent(report, "data", f"{name}_peak_rss", why, params)
        return
    common = (
        "RasterDataset S2 (stack | per-band) and S1 (stack | per-polarisation), time_series, "
        "IntersectionDataset(s2, s1, spatial_only=True), "
    )
    cfg = {
        "sampler": sampler,
        "manifest": str(embedded),
        "raw": str(Path(embedded).parent / "raw"),
        "tile": TILE,
        "stride": SPACING,
        "crop": CROP,
        "seed": 0,
        "ours": {"batch": BATCH, "epochs": 5 if QUICK else 10},
        # random: ours yields two crops per sample, TorchGeo one per draw: equal crops per batch
        "torchgeo": {"batch": BATCH if sampler == "grid" else 2 * BATCH, "epochs": 1},
        "samples": n if sampler == "grid" else 2 * n,
    }
    if sampler == "grid":
        cfg["what_peer"] = common + f"GriddedPatchSampler(size={TILE}, stride={SPACING})"
        cfg["what_ours"] = "build_loader over the shards (s2, s1; torch backend)"
    else:
        cfg["what_peer"] = common + f"RandomPatchSampler(size={CROP}, length={2 * n})"
        cfg["what_ours"] = (
            f"build_loader views (two {CROP} px crops per sample, flips and date jitter off)"
        )
    cfg["what_peer"] += ", DataLoader(collate_fn=stack_samples)"
    _measure_loader(
        report, name, unit, params, cfg, PEER_ROUNDS or LOADER_ROUNDS[sampler], tmp_path,
        check_chips=min(BATCH, n) if sampler == "grid" else 0,
    )  # fmt: skip


def test_loader_vs_torchgeo_bigearthnet(report, tmp_path_factory):
    from skysense.data.ingest import IngestConfig, ingest

    if QUICK:
        pytest.skip("quick mode: the embedded sample only")
    shared = Path(os.environ.get("SKYSENSE_SHARED_DATA", BENCH.parents[1] / "shared" / "data"))
    if not (shared / "bigearthnet").is_dir():
        pytest.skip(f"{shared}/bigearthnet not found")
    name, params = "bigearthnet_s2s1_grid_vs_torchgeo", {"samples": 6, "batch": 2, "tile": 120}
    peer_py, why = peer_python("torchgeo")
    if peer_py is None:
        report_absent(report, "data", f"{name}_samples_per_s", why, params)
        report_absent(report, "data", f"{name}_peak_rss", why, params)
        return
    rep = ingest(
        shared / "bigearthnet",
        tmp_path_factory.mktemp("ben_peers"),
        IngestConfig(tile_size=120),
        progress=False,
    )
    cfg = {
        "sampler": "grid",
        "dataset": "bigearthnet",
        "manifest": str(rep.manifest),
        "raw": str(shared / "bigearthnet"),
        "tile": 120,
        "batch": 2,
        "samples": 6,
        "ours": {"epochs": 20},
        "torchgeo": {"epochs": 3, "dump_batches": 100},
        "what_peer": "RasterDataset per-band S2 and per-polarisation S1, time_series, one "
        "IntersectionDataset(s2, s1, spatial_only=True) per UTM zone (patches in their own "
        "CRS), GriddedPatchSampler(size=120, roi=patch), DataLoader(collate_fn=stack_samples)",
        "what_ours": "build_loader over the shards (s2, s1; torch backend)",
    }
    tmp = tmp_path_factory.mktemp("ben_peers_cfg")
    _measure_loader(report, name, "samples/s", params, cfg, PEER_ROUNDS or 2, tmp, check_chips=6)


# ----------------------------------------------------------------------------------------------
# Large-scene inference: TerraTorch's tiled_inference against skysense infer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infer_model(tmp_path_factory):
    """The tiny preset with a UperNet segmentation head (random weights), as a fine-tuned file."""
    d = tmp_path_factory.mktemp("peer_infer")
    return tiny_segmentation_file(d / "m.pt", WINDOW, OVERLAP)


def _scene(path: Path, side: int) -> None:
    rng = np.random.default_rng(side)
    with rasterio.open(
        path, "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8",
        crs="EPSG:32631", transform=Affine(0.5, 0, 440000, 0, -0.5, 5000000), tiled=True,
        blockxsize=256, blockysize=256,
    ) as ds:  # fmt: skip
        for y in range(0, side, 1024):  # row bands: the generator holds no whole scene
            h = min(1024, side - y)
            ds.write(
                rng.integers(0, 255, (3, h, side), dtype=np.uint8),
                window=rasterio.windows.Window(0, y, side, h),
            )


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _peer_need(side: int) -> int:
    """Bytes the peer holds at once for a side^2 RGB scene, 4 classes: the uint8 scene and its
    float32 copy, the float32 accumulators (4 classes + the weight count) and their quotient,
    the int64 argmax: 3 + 12 + 16 + 4 + 16 + 8 bytes per pixel (59)."""
    return 59 * side * side


@pytest.mark.parametrize("side", SIDES)
def test_infer_vs_terratorch(report, request, tmp_path, side):
    params = {"side": side, "window": WINDOW, "overlap": OVERLAP, "batch": INFER_BATCH}
    name_t = f"infer windows/s, {side}^2 scene, vs TerraTorch tiled_inference"
    name_m = f"infer peak RSS rise, {side}^2 scene, vs TerraTorch tiled_inference"
    peer_py, why = peer_python("terratorch")
    if peer_py is None:
        report_absent(report, "downstream", name_t, why, params)
        report_absent(report, "downstream", name_m, why, params)
        return
    need, avail = _peer_need(side), _mem_available()
    if need * 1.5 > avail:
        why = (
            f"not run at {side}^2: the peer holds the whole scene and its accumulators "
            f"(~{need / 2**30:.1f} GiB) and {avail / 2**30:.1f} GiB is available"
        )
        report_absent(report, "downstream", name_t, why, params)
        report_absent(report, "downstream", name_m, why, params)
        return
    infer_model = request.getfixturevalue("infer_model")  # built only where the peer runs
    scene = tmp_path / "scene.tif"
    _scene(scene, side)
    rounds = PEER_ROUNDS or (2 if side == 1536 else 1)  # 4096, 8192: one (minutes each)
    ours_py = _ours_python()
    res = {"ours": [], "terratorch": []}
    oom = None
    for r in range(rounds):
        res["ours"].append(
            _run(ours_py, PEERS / "infer_run.py", "ours", infer_model, scene,
                 tmp_path / "ours.tif", WINDOW, OVERLAP, INFER_BATCH)
        )  # fmt: skip
        try:
            res["terratorch"].append(
                _run(peer_py, PEERS / "infer_run.py", "terratorch", infer_model, scene,
                     tmp_path / "peer.tif", WINDOW, OVERLAP, INFER_BATCH)
            )  # fmt: skip
        except RuntimeError as e:
            if "MemoryError" in str(e) or "exited -9" in str(e) or "alloc" in str(e):
                oom = str(e)[-300:]
                break
            raise
        if r == 0:
            with (
                rasterio.open(tmp_path / "ours.tif") as a,
                rasterio.open(tmp_path / "peer.tif") as b,
            ):
                agree = float((a.read(1) == b.read(1)).mean())
            assert agree >= 0.95, f"class maps agree on {agree:.3f} of the pixels only"
    scene.unlink()
    if oom is not None:
        why = f"peer out of memory at {side}^2: {oom}"
        report_absent(report, "downstream", name_t, why, params)
        report_absent(report, "downstream", name_m, why, params)
        return
    n = res["ours"][0]["scene_windows"]  # the scene's window grid (the last one flush)
    label = _peer_label(res["terratorch"][0]["versions"], "terratorch")
    what = (
        f"tiled_inference(model_forward, scene tensor, crop={WINDOW}, "
        f"stride={WINDOW - OVERLAP}, delta=0, padding=False, batch_size={INFER_BATCH}) over "
        "this project's model and softmax; scene read whole, normalised as one tensor; argmax "
        "written as a tiled GeoTIFF"
    )
    fw_o = res["ours"][0]["forward_windows"]
    fw_p = res["terratorch"][0]["forward_windows"]
    # Wall time = CPU time + time queued for a CPU (other processes' share) + time blocked (I/O,
    # sleeps): the last is what the CPU clock would hide, so the note gives it.
    blocked = {
        k: max(
            0.0,
            float(np.median([x["seconds"] - x["cpu_seconds"] - x["queued_seconds"] for x in v])),
        )
        for k, v in res.items()
    }
    _speed_figures(
        report, "downstream", name_t, "windows/s", n,
        {"ours": [x["seconds"] for x in res["ours"]],
         "peer": [x["seconds"] for x in res["terratorch"]]},
        {"ours": [x["cpu_seconds"] for x in res["ours"]],
         "peer": [x["cpu_seconds"] for x in res["terratorch"]]},
        params, f"TerraTorch ({label}): {what}",
        f"{n} windows in the scene's grid per second of the whole run (read, normalise, "
        f"forwards, blend, write); forwards run: ours {fw_o} (windows on block edges run once "
        f"per block: blocks of 1024 px), TerraTorch {fw_p}; ours also copies its output into "
        f"a COG; wall time neither on a CPU nor queued for one (I/O): ours "
        f"{blocked['ours']:.2f} s, TerraTorch {blocked['terratorch']:.2f} s",
    )  # fmt: skip
    rss_o = float(np.median([x["rss_rise_mib"] for x in res["ours"]])) * MIB
    rss_p = float(np.median([x["rss_rise_mib"] for x in res["terratorch"]])) * MIB
    report.add(
        "downstream",
        name_m,
        rss_o / MIB,
        "MiB",
        baseline=rss_p / MIB,
        baseline_name=f"TerraTorch ({label}): the same run",
        ratio=mem_ratio(rss_p, rss_o),
        params=params,
        note=mem_note(
            rss_p,
            rss_o,
            "ours holds one 1024 px block and one batch of windows; the peer holds the scene "
            "as float32 and its float32 accumulators",
        ),
    )

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
  each step by its date: S2 within 1 DN, S1 within 1e-4 dB) before anything is timed.
- downstream: windows/s and the resident peak's rise of TerraTorch's ``tiled_inference`` over
  this project's tiny segmentation model (same network, same softmax) against ``skysense infer``
  on generated 1536^2, 4096^2 and 8192^2 scenes (quick: 256^2), window 128, overlap 16, batches
  of 8; the two class maps are checked to agree on >= 95 % of the pixels (the blend weights
  differ in the overlaps).

Each figure also records its round-to-round spread ((max - min) / median of the per-round
ratios) as an "info" figure: the measured noise that the guard's tolerance has to cover.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from benchlib import MIB, QUICK, mem_note, mem_ratio, peer_python, report_absent, spread

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"

BATCH = 4 if QUICK else 8
TILE, CROP = 24, 16  # the embedded sample's tile; the random crop (16 px: TorchGeo's random
# sampler keeps a chip's half-diagonal inside the data, which leaves no room for a 24 px chip)
SPACING = 200  # px between neighbouring places of the embedded sample (2000 m at 10 m)
LOADER_ROUNDS = {"grid": 1 if QUICK else 2, "random": 1}
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


# ----------------------------------------------------------------------------------------------
# Loader: TorchGeo 0.10 against build_loader
# ----------------------------------------------------------------------------------------------


def _loader_cfg(side, sampler, embedded: Path, n: int, tmp: Path, dump=None) -> Path:
    cfg = {
        "side": side,
        "sampler": sampler,
        "manifest": str(embedded),
        "raw": str(Path(embedded).parent / "raw"),
        "tile": TILE,
        "stride": SPACING,
        "crop": CROP,
        "batch": BATCH if sampler == "grid" else 2 * BATCH,  # random: ours yields 2 crops/sample
        "samples": n if sampler == "grid" else 2 * n,
        "epochs": (10 if side == "ours" else 1) if not QUICK else (5 if side == "ours" else 1),
        "seed": 0,
        "dump": str(dump) if dump else None,
    }
    if side == "ours" and sampler == "random":
        cfg["batch"] = BATCH
    path = tmp / f"{side}-{sampler}.json"
    path.write_text(json.dumps(cfg))
    return path


def _check_same_pixels(embedded: Path, dump: Path) -> int:
    """Every chip of TorchGeo's first grid batch against our loader's sample of the same place:
    the same dates, the same pixels (where ours marks them valid). Returns pixels compared."""
    from skysense.data.assemble import normalisation
    from skysense.data.loader import build_loader
    from skysense.data.manifest import Manifest

    man = Manifest(Path(embedded))
    a = np.load(dump)
    dates = json.loads(str(a["meta"]))["dates"]
    origin = {}
    for g, t in man.query("SELECT grp, transform FROM groups"):
        t = json.loads(t)
        origin[(round(t[2]), round(t[5]))] = g
    sid_of = {g: sid for sid, g in man.query("SELECT id, grp FROM samples")}
    lo = build_loader(embedded, None, 1024, "torch", shuffle=False, modalities=("s2", "s1"))
    ours = next(iter(lo))
    row = {int(s): i for i, s in enumerate(ours["sample_id"])}
    tol = {"s2": 1.0, "s1": 1e-4}  # S2: 20 m bands of per-band files, resampled by each side
    compared = 0
    assert len(a["bounds"]) == min(BATCH, len(row))
    for j, b in enumerate(a["bounds"]):
        # bounds: [xmin, xmax, xres, ymin, ymax, yres, tmin, tmax, tres]; a place by its corner
        g = origin[(round(float(b[0])), round(float(b[4])))]
        i = row[sid_of[g]]
        for k, m in enumerate(("s2", "s1")):
            mean, std = (torch.as_tensor(v)[:, None, None] for v in normalisation(man, m, "spec"))
            ours_doy = ours[m + "_doy"][i][ours[m + "_valid"][i]].tolist()
            doys = [
                dt.date(int(d[:4]), int(d[4:6]), int(d[6:])).timetuple().tm_yday
                for d in dates[2 * j + k]
            ]
            assert set(ours_doy) <= set(doys), f"{g} {m}: dates {ours_doy} vs TorchGeo {doys}"
            for t, doy in enumerate(doys):
                if doy not in ours_doy:
                    continue  # a step ingest found unusable (too little valid data)
                s = ours[m + "_doy"][i].tolist().index(doy)
                valid = ours[m + "_pixel_valid"][i, s]
                x = ours[m][i, s] * std + mean
                peer = torch.as_tensor(a[m][j, t])
                diff = (x - peer).abs()[:, valid]
                assert diff.numel() == 0 or float(diff.max()) <= tol[m], (
                    f"{g} {m} doy {doy}: max |ours - TorchGeo| = {float(diff.max())}"
                )
                compared += diff.numel()
    return compared


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
    ours_py = _ours_python()
    dump = tmp_path / "torchgeo-first-batch.npz" if sampler == "grid" else None
    res = {"ours": [], "torchgeo": []}
    for r in range(LOADER_ROUNDS[sampler]):
        for side, py in (("ours", ours_py), ("torchgeo", peer_py)):
            cfg = _loader_cfg(side, sampler, embedded, n, tmp_path, dump if r == 0 else None)
            res[side].append(_run(py, PEERS / "loader_run.py", cfg))
        assert res["ours"][-1]["samples"] == res["torchgeo"][-1]["samples"]
        if r == 0 and dump is not None:
            assert _check_same_pixels(embedded, dump) > 0
    count = res["ours"][0]["samples"]
    per = {s: [float(np.median(x["epoch_seconds"])) for x in v] for s, v in res.items()}
    t_ours, t_peer = float(np.median(per["ours"])), float(np.median(per["torchgeo"]))
    ratios = [p / o for o, p in zip(per["ours"], per["torchgeo"])]
    label = _peer_label(res["torchgeo"][0]["versions"], "torchgeo")
    what = (
        "RasterDataset S2 (stack | per-band) and S1 (stack | per-polarisation), time_series, "
        "IntersectionDataset(s2, s1, spatial_only=True), "
        + (
            f"GriddedPatchSampler(size={TILE}, stride={SPACING})"
            if sampler == "grid"
            else f"RandomPatchSampler(size={CROP})"
        )
        + ", DataLoader(collate_fn=stack_samples)"
    )
    ours_what = (
        "build_loader over the shards (s2, s1; torch backend)"
        if sampler == "grid"
        else f"build_loader views (two {CROP} px crops per sample, flips and date jitter off)"
    )
    report.add(
        "data",
        f"{name}_{unit.split('/')[0]}_per_s",
        count / t_ours,
        unit,
        baseline=count / t_peer,
        baseline_name=f"TorchGeo ({label}): {what}",
        ratio=t_peer / t_ours,
        params=params,
        note=f"ours: {ours_what}; {len(ratios)} interleaved rounds (fresh processes), "
        f"round ratios {', '.join(f'{x:.3g}' for x in ratios)}"
        + ("; batches checked: same places, dates and pixels" if sampler == "grid" else ""),
    )
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
    if len(ratios) < 2:
        return
    report.add(
        "data",
        f"{name} round-to-round spread",
        spread(ratios),
        "",
        kind="info",
        params=params,
        note="(max - min) / median of the per-round speed ratios",
    )


# ----------------------------------------------------------------------------------------------
# Large-scene inference: TerraTorch's tiled_inference against skysense infer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infer_model(tmp_path_factory):
    """The tiny preset with a UperNet segmentation head (random weights), as a fine-tuned file."""
    from skysense.encoders import build_skysense
    from skysense.tasks.downstream.checkpoint import save_finetuned
    from skysense.tasks.downstream.data import _sensor_inputs
    from skysense.tasks.downstream.model import build_task_model

    d = tmp_path_factory.mktemp("peer_infer")
    torch.manual_seed(0)
    model = build_task_model(
        build_skysense("tiny"),
        "segmentation",
        "hr",
        4,
        {"hr": torch.randn(1, 3, WINDOW, WINDOW)},
        head_channels=32,
    )
    meta = {
        "preset": "tiny",
        "overrides": {},
        "kind": "segmentation",
        "source": "hr",
        "n_classes": 4,
        "channels": model.channels,
        "head": {"head_channels": 32},
        "classes": list("abcd"),
        "inputs": _sensor_inputs({"hr": "hr_rgb"}, "hr"),
        "eval": {"window": WINDOW, "overlap": OVERLAP},
    }
    save_finetuned(d / "m.pt", model, meta)
    return d / "m.pt"


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
def test_infer_vs_terratorch(report, infer_model, tmp_path, side):
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
    scene = tmp_path / "scene.tif"
    _scene(scene, side)
    rounds = 2 if side == 1536 else 1  # quick: one; 4096 and 8192: one (minutes each)
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
    t_o = [x["seconds"] for x in res["ours"]]
    t_p = [x["seconds"] for x in res["terratorch"]]
    ratios = [p / o for o, p in zip(t_o, t_p)]
    label = _peer_label(res["terratorch"][0]["versions"], "terratorch")
    what = (
        f"tiled_inference(model_forward, scene tensor, crop={WINDOW}, "
        f"stride={WINDOW - OVERLAP}, delta=0, padding=False, batch_size={INFER_BATCH}) over "
        "this project's model and softmax; scene read whole, normalised as one tensor; argmax "
        "written as a tiled GeoTIFF"
    )
    ours_t, peer_t = float(np.median(t_o)), float(np.median(t_p))
    fw_o = res["ours"][0]["forward_windows"]
    fw_p = res["terratorch"][0]["forward_windows"]
    report.add(
        "downstream",
        name_t,
        n / ours_t,
        "windows/s",
        baseline=n / peer_t,
        baseline_name=f"TerraTorch ({label}): {what}",
        ratio=peer_t / ours_t,
        params=params,
        note=(
            f"{n} windows in the scene's grid per wall second of the whole run (read, "
            f"normalise, forwards, blend, write); forwards run: ours {fw_o} (windows on block "
            f"edges run once per block: blocks of 1024 px), TerraTorch {fw_p}; ours also "
            "copies its output into a COG. "
            f"{len(ratios)} interleaved round(s) in fresh processes, round ratios "
            + ", ".join(f"{x:.3g}" for x in ratios)
        ),
    )
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
    if len(ratios) > 1:
        report.add(
            "downstream",
            f"infer vs TerraTorch, {side}^2 scene, round-to-round spread",
            spread(ratios),
            "",
            kind="info",
            params=params,
            note="(max - min) / median of the per-round speed ratios",
        )

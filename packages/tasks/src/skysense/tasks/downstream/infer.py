"""`skysense infer`: a fine-tuned model over a scene of any size, into a Cloud-Optimized GeoTIFF.

The scene is covered by overlapping windows on one grid; windows go through the model in
batches and their predictions are blended (:mod:`sliding`). The output is produced block by
block (a block: a square of whole window strides, ``block`` pixels by default 1024): each block
reads only the windows that overlap it, blends them, and is written to a tiled GeoTIFF at once,
so memory holds one block and one batch of windows whatever the scene size. When every block is
written, GDAL's COG driver copies the tiled file into a Cloud-Optimized GeoTIFF (overviews,
tiles, compression) and that file is renamed to the destination: a run killed or interrupted at
any point leaves no file under the destination's name (only ``.<name>.partial*`` files, which
an interrupted run removes on its way out).

The output has the reference input's CRS, transform and size (for Sentinel-2 band folders, the
grid of the 10 m bands). Pixels where the input has no data stay nodata: class maps are uint8
with nodata 255, probability maps float32 with nodata NaN. Change detection takes two dates
(``src`` and ``src2``) on the same grid. Detection models write their boxes as GeoJSON polygons
in the scene's CRS instead (:func:`run_detection`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
import torch
from tqdm import tqdm

from skysense.tasks.downstream.checkpoint import load_finetuned
from skysense.tasks.downstream.datasets.common import collate, normalise, series_sample, to_device
from skysense.tasks.downstream.evaluation import probabilities
from skysense.tasks.downstream.scene import SceneReader
from skysense.tasks.downstream.sliding import WindowGrid, iterate_blocks, predict_region

log = logging.getLogger(__name__)

CLASS_NODATA = 255


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_detection(
    model,
    meta: Mapping,
    src,
    dst,
    window: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    score_threshold: float = 0.3,
    nms_iou: float = 0.5,
) -> dict:
    """Boxes of a detection model over a whole HR scene, as GeoJSON polygons in the scene's CRS.

    Windows overlap so that an object cut by one window's edge lies whole in a neighbour (set
    the overlap above the largest object's size): boxes touching an inner window edge are
    dropped, the others (shifted to scene pixels) go through one class-wise non-maximum
    suppression. Memory holds a batch of windows and the boxes. Written to a temporary name and
    renamed when complete.
    """
    from torchvision.ops import batched_nms

    inputs = meta["inputs"]
    ev = meta.get("eval") or {}
    window = int(window or ev.get("window") or 256)
    overlap = int(overlap if overlap is not None else ev.get("overlap", window // 4))
    dst = Path(dst)
    if dst.suffix.lower() not in (".geojson", ".json"):
        raise ValueError(
            f"a detection model writes boxes: give DST a .geojson name, not {dst.name}"
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (overwrite=true to replace it)")
    dev = torch.device(device)
    model.to(dev).eval()
    boxes, scores, labels = [], [], []
    with ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        reader = stack.enter_context(
            SceneReader(src, inputs["sensors"]["hr"], inputs["hr"]["bands"])
        )
        grid = reader.grid
        wg = WindowGrid(grid.height, grid.width, window, overlap)
        wins = [(t, left) for t in wg.tops for left in wg.lefts]
        for i in tqdm(
            range(0, len(wins), batch_size), desc="infer", unit="batch", disable=not progress
        ):
            chunk = wins[i : i + batch_size]
            imgs = []
            for t, left in chunk:
                x, _ = normalise(
                    reader.read(grid.window(t, left, window, window)),
                    inputs["hr"]["mean"],
                    inputs["hr"]["std"],
                )
                imgs.append(x.to(dev))
            with torch.no_grad():
                outs = model(imgs)
            for (t, left), o in zip(chunk, outs):
                wb = o["boxes"].cpu()
                # A box touching an inner window edge is an object cut by that edge: the
                # neighbouring window, which overlaps this one, sees it whole.
                cut = (
                    ((wb[:, 0] <= 1) & (left > 0))
                    | ((wb[:, 1] <= 1) & (t > 0))
                    | ((wb[:, 2] >= window - 1) & (left + window < grid.width))
                    | ((wb[:, 3] >= window - 1) & (t + window < grid.height))
                )
                keep = (o["scores"].cpu() >= score_threshold) & ~cut
                b = wb[keep] + torch.tensor([left, t, left, t], dtype=torch.float32)
                b[:, [0, 2]] = b[:, [0, 2]].clamp(0, grid.width)
                b[:, [1, 3]] = b[:, [1, 3]].clamp(0, grid.height)
                boxes.append(b)
                scores.append(o["scores"][keep].cpu())
                labels.append(o["labels"][keep].cpu())
    b, sc, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(b, sc, lab, nms_iou) if len(b) else torch.zeros(0, dtype=torch.int64)
    classes = meta["classes"]
    feats = []
    for j in keep.tolist():
        x0, y0, x1, y1 = b[j].tolist()
        ring = [
            grid.transform @ (x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))
        ]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
                "properties": {
                    "label": classes[int(lab[j])],
                    "score": round(float(sc[j]), 4),
                    "pixel_box": [x0, y0, x1, y1],
                },
            }
        )
    crs = grid.crs.to_string()
    doc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": crs}},
        "features": feats,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote %s: %d boxes from %d windows", dst, len(feats), len(wins))
    return {
        "dst": str(dst),
        "height": grid.height,
        "width": grid.width,
        "crs": crs,
        "windows": len(wins),
        "boxes": len(feats),
        "peak_rss_mb": peak_rss_mb(),
    }


def check_scenes(scenes: Mapping[str, list], sensors: Mapping[str, str], strict: bool) -> None:
    """Each scene (modality -> paths) against the sensor the model was fine-tuned on
    (:func:`skysense.tasks.downstream.scene.scene_problems`). Raises ValueError naming the file
    and what differs when ``strict``; logs a warning otherwise."""
    from skysense.tasks.downstream.scene import scene_problems

    for mod, paths in scenes.items():
        if mod not in sensors:
            continue
        for path in paths:
            problems = scene_problems(path, sensors[mod])
            if not problems:
                continue
            msg = (
                f"{path} does not look like the {sensors[mod]} input the model was fine-tuned "
                f"on: {'; '.join(problems)}"
            )
            if strict:
                raise ValueError(msg + " (check_sensor=false runs it anyway)")
            log.warning("%s (check_sensor=false: running anyway)", msg)


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


def _sample(
    readers: Mapping[str, SceneReader], grids: Mapping, inputs: Mapping
) -> tuple[dict, np.ndarray]:
    """One window of every modality as a contract sample, and the reference validity (h, w)."""
    sample, valid = {}, None
    for m, r in readers.items():
        arr = r.read(grids[m])
        x, ok = normalise(arr, inputs[m]["mean"], inputs[m]["std"])
        if m == inputs["reference"]:
            valid = ok.numpy()
        doy = r.date.timetuple().tm_yday if r.date is not None else 0
        if m == "hr":
            sample["hr"] = x
            sample["hr_doy"] = torch.tensor(doy, dtype=torch.int64)
        else:
            sample.update(series_sample(m, [x], [doy]))
    return sample, valid


def run_inference(
    weights: str | Path,
    src: str | Path,
    dst: str | Path,
    src2: str | Path | None = None,
    extra: Mapping[str, str] | None = None,
    window: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    block: int = 1024,
    output: str = "classes",
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    gdal_cache_mb: int = 64,
    check_sensor: bool = True,
) -> dict:
    """Predict over a whole scene and write a COG. Returns a report (shape, windows, peak RSS).

    Args:
        weights: fine-tuned model file (``skysense finetune`` writes ``<run>/model.pt``).
        src: the scene of the model's reference modality (GeoTIFF stack or per-band folder).
        dst: output path (.tif).
        src2: the second date (change detection).
        extra: other modalities of a multi-modal model: modality -> path, warped onto the
            reference grid (HR onto the same footprint at its pixel size).
        window, overlap: in reference pixels (default: the model's evaluation settings).
        batch_size: windows per forward.
        block: output block side (pixels): memory grows with its square, not with the scene.
        output: "classes" (uint8 argmax, nodata 255; change models with a ``threshold`` in
            their metadata: P(change) >= threshold) or "probabilities" (float32 per class,
            nodata NaN; multi-label models: per-class sigmoid).
        check_sensor: stop when a scene does not look like the product the model was
            fine-tuned on (:func:`check_scenes`); False: warn and go on.
    """
    model, meta = load_finetuned(weights)
    kind, inputs = meta["kind"], meta["inputs"]
    scenes = {inputs.get("reference", "hr"): [src] + ([src2] if src2 is not None else [])}
    for m, path in (extra or {}).items():
        scenes.setdefault(m, []).append(path)
    check_scenes(scenes, inputs["sensors"], strict=check_sensor)
    remove_stale_partials(Path(dst))
    if kind == "detection":
        return run_detection(
            model, meta, src, dst, window, overlap, batch_size, device, overwrite, progress
        )
    if output not in ("classes", "probabilities"):
        raise ValueError(f"output must be 'classes' or 'probabilities', not {output!r}")
    if kind == "change" and src2 is None:
        raise ValueError("a change-detection model needs the second date: src2=...")
    if kind != "change" and src2 is not None:
        raise ValueError(f"src2 is for change detection; this model is {kind}")
    ref = inputs["reference"]
    mods = list(inputs["modalities"])
    extra = dict(extra or {})
    missing = [m for m in mods if m != ref and m not in extra]
    if missing:
        raise ValueError(
            f"the model takes {mods}; give the other modalities: extra.{missing[0]}=PATH"
        )
    ev = meta.get("eval") or {}
    window = int(window or ev.get("window") or 128)
    overlap = int(overlap if overlap is not None else ev.get("overlap", window // 4))
    dev = torch.device(device)
    model.to(dev).eval()
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (overwrite=true to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}.tif")
    cog_tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}.cog.tif")
    n_out = meta["n_classes"]
    with ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb))
        stack.enter_context(terminate_as_interrupt())
        dates = [src] + ([src2] if kind == "change" else [])
        readers_per_date = []
        for path in dates:
            rd = {
                ref: stack.enter_context(
                    SceneReader(path, inputs["sensors"][ref], inputs[ref]["bands"])
                )
            }
            for m in mods:
                if m != ref:
                    rd[m] = stack.enter_context(
                        SceneReader(extra[m], inputs["sensors"][m], inputs[m]["bands"])
                    )
            readers_per_date.append(rd)
        grid = readers_per_date[0][ref].grid
        for i, rd in enumerate(readers_per_date[1:], start=2):
            if not rd[ref].grid.same_as(grid):
                raise ValueError(f"date {i} ({dates[i - 1]}) is not on the grid of date 1 ({src})")
        hr_factor = 1
        if "hr" in mods and ref != "hr":
            hr_factor = max(1, int(round(grid.res[0] / readers_per_date[0]["hr"].grid.res[0])))
        wg = WindowGrid(grid.height, grid.width, window, overlap)
        blocks = list(iterate_blocks(wg, block))
        total = sum(len(wg.windows_in(*b)) for b in blocks)
        log.info(
            "infer %s: %d x %d px, %d windows of %d (overlap %d) in %d blocks -> %s",
            src,
            grid.height,
            grid.width,
            len(wg),
            window,
            overlap,
            len(blocks),
            dst,
        )
        profile = {
            "driver": "GTiff",
            "height": grid.height,
            "width": grid.width,
            "count": 1 if output == "classes" else n_out,
            "dtype": "uint8" if output == "classes" else "float32",
            "nodata": CLASS_NODATA if output == "classes" else float("nan"),
            "crs": grid.crs,
            "transform": grid.transform,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        bar = tqdm(total=total, desc="infer", unit="window", disable=not progress)
        try:
            with rasterio.open(tmp, "w", **profile) as out:
                for y0, y1, x0, x1 in blocks:
                    valid = np.zeros((y1 - y0, x1 - x0), bool)

                    def predict(chunk, y0=y0, y1=y1, x0=x0, x1=x1, valid=valid):
                        samples = []
                        for top, left in chunk:
                            wgrid = grid.window(top, left, window, window)
                            grids = {m: wgrid for m in mods}
                            if "hr" in mods and ref != "hr":
                                grids["hr"] = wgrid.scaled(hr_factor)
                            per_date = [_sample(rd, grids, inputs) for rd in readers_per_date]
                            ok = np.logical_and.reduce([v for _, v in per_date])
                            a0, a1 = max(top, y0), min(top + window, y1)
                            b0, b1 = max(left, x0), min(left + window, x1)
                            valid[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = ok[
                                a0 - top : a1 - top, b0 - left : b1 - left
                            ]
                            if kind == "change":
                                samples.append({"t1": per_date[0][0], "t2": per_date[1][0]})
                            else:
                                samples.append(per_date[0][0])
                        with torch.no_grad():
                            return probabilities(
                                model, kind, to_device(collate(samples), dev), window
                            )

                    prob = predict_region(
                        predict, wg, (y0, y1, x0, x1), n_out, batch_size, on_window=bar.update
                    )
                    win = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
                    if output == "classes" and kind == "change" and meta.get("threshold"):
                        # the decision threshold chosen on the validation split at fine-tuning
                        cls = (prob[1] >= meta["threshold"]).numpy().astype(np.uint8)
                        cls[~valid] = CLASS_NODATA
                        out.write(cls, 1, window=win)
                    elif output == "classes":
                        cls = prob.argmax(0).numpy().astype(np.uint8)
                        cls[~valid] = CLASS_NODATA
                        out.write(cls, 1, window=win)
                    else:
                        p = prob.numpy()
                        p[:, ~valid] = np.nan
                        out.write(p, window=win)
            bar.close()
            rasterio.shutil.copy(
                tmp,
                cog_tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                BLOCKSIZE=256,
                OVERVIEW_RESAMPLING="NEAREST" if output == "classes" else "AVERAGE",
                BIGTIFF="IF_SAFER",
            )
            os.replace(cog_tmp, dst)
        finally:
            bar.close()
            for p in (tmp, cog_tmp):
                if p.exists():
                    p.unlink()
    report = {
        "dst": str(dst),
        "height": grid.height,
        "width": grid.width,
        "crs": str(grid.crs),
        "windows": len(wg),
        "window_evaluations": total,
        "blocks": len(blocks),
        "peak_rss_mb": peak_rss_mb(),
    }
    log.info(
        "wrote %s (%d x %d); peak RSS %.0f MB", dst, grid.height, grid.width, report["peak_rss_mb"]
    )
    return report

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

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
import torch
from tqdm import tqdm

from skysense.tasks.downstream.checkpoint import load_finetuned
from skysense.tasks.downstream.datasets.common import collate, normalise, to_device
from skysense.tasks.downstream.evaluation import probabilities
from skysense.tasks.downstream.outputs import (
    CLASS_NODATA,
    StagedOutput,
    boxes_geojson,
    publish_cog,
    publish_json,
    raster_profile,
    remove_stale_partials,
    terminate_as_interrupt,
    write_prediction,
)
from skysense.tasks.downstream.scene import SceneReader, SceneStack, check_scenes
from skysense.tasks.downstream.sliding import WindowGrid, iterate_blocks, predict_region

__all__ = ["CLASS_NODATA", "peak_rss_mb", "run_detection", "run_inference"]

log = logging.getLogger(__name__)


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


def _window_settings(meta: Mapping, window, overlap, default: int) -> tuple[int, int]:
    """Window and overlap in reference pixels: given, else the model's evaluation settings."""
    ev = meta.get("eval") or {}
    window = int(window or ev.get("window") or default)
    overlap = int(overlap if overlap is not None else ev.get("overlap", window // 4))
    return window, overlap


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
    _check_request(kind, inputs, output, src2, extra or {})
    window, overlap = _window_settings(meta, window, overlap, default=128)
    dev = torch.device(device)
    model.to(dev).eval()
    threshold = meta.get("threshold") if kind == "change" else None
    with ExitStack() as stack:
        staged = stack.enter_context(StagedOutput(dst, overwrite))
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb))
        stack.enter_context(terminate_as_interrupt())
        dates = [src] + ([src2] if kind == "change" else [])
        scene = SceneStack(stack, dates, extra or {}, inputs)
        grid = scene.grid
        wg = WindowGrid(grid.height, grid.width, window, overlap)
        blocks = list(iterate_blocks(wg, block))
        total = sum(len(wg.windows_in(*b)) for b in blocks)
        log.info(
            "infer %s: %d x %d px, %d windows of %d (overlap %d) in %d blocks -> %s",
            *(src, grid.height, grid.width, len(wg), window, overlap, len(blocks), dst),
        )
        tiled = staged.path(".tif")
        profile = raster_profile(grid, output, meta["n_classes"])
        bar = tqdm(total=total, desc="infer", unit="window", disable=not progress)
        with bar, rasterio.open(tiled, "w", **profile) as out:
            for bounds in blocks:
                y0, y1, x0, x1 = bounds
                valid = np.zeros((y1 - y0, x1 - x0), bool)
                predict = _block_predictor(model, kind, scene, dev, window, bounds, valid)
                prob = predict_region(
                    predict, wg, bounds, meta["n_classes"], batch_size, on_window=bar.update
                )
                write_prediction(out, prob, valid, bounds, output, threshold)
        publish_cog(tiled, staged, output)
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


def _check_request(kind: str, inputs: Mapping, output: str, src2, extra: Mapping) -> None:
    """The inputs and output asked for against what the model takes (ValueError naming the
    missing or surplus one)."""
    if output not in ("classes", "probabilities"):
        raise ValueError(f"output must be 'classes' or 'probabilities', not {output!r}")
    if kind == "change" and src2 is None:
        raise ValueError("a change-detection model needs the second date: src2=...")
    if kind != "change" and src2 is not None:
        raise ValueError(f"src2 is for change detection; this model is {kind}")
    mods = list(inputs["modalities"])
    missing = [m for m in mods if m != inputs["reference"] and m not in extra]
    if missing:
        raise ValueError(
            f"the model takes {mods}; give the other modalities: extra.{missing[0]}=PATH"
        )


def _block_predictor(model, kind: str, scene: SceneStack, dev, window: int, bounds, valid):
    """The batch function :func:`predict_region` calls for the block ``bounds`` (y0, y1, x0,
    x1): windows (top, left) -> (B, C, window, window) probabilities; it marks in ``valid``
    (the block's (h, w) bool mask) the pixels where the input has data."""
    y0, y1, x0, x1 = bounds

    def predict(chunk):
        samples = []
        for top, left in chunk:
            per_date, ok = scene.window(top, left, window)
            a0, a1 = max(top, y0), min(top + window, y1)
            b0, b1 = max(left, x0), min(left + window, x1)
            valid[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = ok[
                a0 - top : a1 - top, b0 - left : b1 - left
            ]
            samples.append(
                {"t1": per_date[0], "t2": per_date[1]} if kind == "change" else per_date[0]
            )
        with torch.no_grad():
            return probabilities(model, kind, to_device(collate(samples), dev), window)

    return predict


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

    hr = meta["inputs"]["hr"]
    window, overlap = _window_settings(meta, window, overlap, default=256)
    dst = Path(dst)
    if dst.suffix.lower() not in (".geojson", ".json"):
        raise ValueError(
            f"a detection model writes boxes: give DST a .geojson name, not {dst.name}"
        )
    dev = torch.device(device)
    model.to(dev).eval()
    found = []  # (boxes in scene pixels, scores, labels) per window
    with ExitStack() as stack:
        staged = stack.enter_context(StagedOutput(dst, overwrite))
        stack.enter_context(terminate_as_interrupt())
        reader = stack.enter_context(SceneReader(src, meta["inputs"]["sensors"]["hr"], hr["bands"]))
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
                    reader.read(grid.window(t, left, window, window)), hr["mean"], hr["std"]
                )
                imgs.append(x.to(dev))
            with torch.no_grad():
                outs = model(imgs)
            found += [
                _whole_boxes(o, t, left, window, grid, score_threshold)
                for (t, left), o in zip(chunk, outs)
            ]
        b, sc, lab = (torch.cat(parts) for parts in zip(*found))
        keep = batched_nms(b, sc, lab, nms_iou) if len(b) else torch.zeros(0, dtype=torch.int64)
        doc = boxes_geojson(b[keep], sc[keep], lab[keep], meta["classes"], grid)
        publish_json(doc, staged)
    log.info("wrote %s: %d boxes from %d windows", dst, len(keep), len(wins))
    return {
        "dst": str(dst),
        "height": grid.height,
        "width": grid.width,
        "crs": grid.crs.to_string(),
        "windows": len(wins),
        "boxes": len(keep),
        "peak_rss_mb": peak_rss_mb(),
    }


def _whole_boxes(out: Mapping, top: int, left: int, window: int, grid, score_threshold: float):
    """One window's detections above ``score_threshold`` that no inner window edge cuts, as
    (boxes (N, 4) float32 in scene pixels, clamped to the scene; scores (N,); labels (N,))."""
    wb, scores = out["boxes"].cpu(), out["scores"].cpu()
    # A box touching an inner window edge is an object cut by that edge: the neighbouring
    # window, which overlaps this one, sees it whole.
    cut = (
        ((wb[:, 0] <= 1) & (left > 0))
        | ((wb[:, 1] <= 1) & (top > 0))
        | ((wb[:, 2] >= window - 1) & (left + window < grid.width))
        | ((wb[:, 3] >= window - 1) & (top + window < grid.height))
    )
    keep = (scores >= score_threshold) & ~cut
    b = wb[keep] + torch.tensor([left, top, left, top], dtype=torch.float32)
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, grid.width)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, grid.height)
    return b, scores[keep], out["labels"][keep].cpu()

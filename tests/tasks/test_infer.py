"""Large-scene inference: the window grid and blending, `skysense infer`'s georeferenced COG
output, bounded memory at two scene sizes, and what an interrupted run leaves behind.

The model is a task head on the contract stand-in encoder (fast); the integration tier runs the
real tiny preset (tests/integration/test_downstream_infer.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from test_downstream_standin import StandInSkySense, build_standin

import skysense.encoders
from skysense.tasks.downstream.checkpoint import save_finetuned
from skysense.tasks.downstream.data import _sensor_inputs
from skysense.tasks.downstream.datasets.common import normalise
from skysense.tasks.downstream.evaluation import predict_scene
from skysense.tasks.downstream.infer import CLASS_NODATA, run_inference
from skysense.tasks.downstream.model import build_task_model
from skysense.tasks.downstream.sliding import WindowGrid, iterate_blocks, predict_region, taper

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- windows, blending


@pytest.mark.unit
def test_window_grid_covers_the_scene():
    g = WindowGrid(100, 37, window=32, overlap=8)
    assert g.tops == [0, 24, 48, 68] and g.lefts == [0, 5]
    cover = np.zeros((100, 37), int)
    for t in g.tops:
        for left in g.lefts:
            cover[t : t + 32, left : left + 32] += 1
    assert cover.min() >= 1
    small = WindowGrid(10, 12, window=32, overlap=8)
    assert small.tops == [0] and small.lefts == [0]
    with pytest.raises(ValueError, match="overlap"):
        WindowGrid(10, 10, 8, 8)


@pytest.mark.unit
def test_taper_is_positive_flat_inside_and_symmetric():
    w = taper(16, 4)
    assert w.min() > 0 and w[4:12, 4:12].eq(1).all()
    torch.testing.assert_close(w, w.flip(0))
    torch.testing.assert_close(w, w.T)
    assert taper(8, 0).eq(1).all()


def _fake_predict(window, n_out=3):
    """A prediction that depends on the window's position (so blending matters)."""

    def predict(chunk):
        out = []
        for t, left in chunk:
            g = torch.Generator().manual_seed(t * 1000 + left)
            out.append(torch.rand(n_out, window, window, generator=g))
        return torch.stack(out)

    return predict


@pytest.mark.unit
@pytest.mark.parametrize(
    "h,w,window,overlap,block", [(70, 53, 16, 4, 24), (40, 41, 16, 6, 16), (9, 30, 16, 4, 8)]
)
def test_blocks_give_the_whole_scene_blend(h, w, window, overlap, block):
    grid = WindowGrid(h, w, window, overlap)
    pred = _fake_predict(window)
    whole = predict_region(pred, grid, (0, h, 0, w), 3, batch_size=5)
    stitched = torch.zeros_like(whole)
    for y0, y1, x0, x1 in iterate_blocks(grid, block):
        stitched[:, y0:y1, x0:x1] = predict_region(pred, grid, (y0, y1, x0, x1), 3, batch_size=3)
    torch.testing.assert_close(stitched, whole)
    # Reference: the weighted mean over every covering window, pixel by pixel, float64.
    wt = taper(window, overlap).double()
    num = torch.zeros(3, h, w, dtype=torch.float64)
    den = torch.zeros(h, w, dtype=torch.float64)
    for t in grid.tops:
        for left in grid.lefts:
            p = pred([(t, left)])[0].double()
            hh, ww = min(window, h - t), min(window, w - left)
            num[:, t : t + hh, left : left + ww] += (p * wt)[:, :hh, :ww]
            den[t : t + hh, left : left + ww] += wt[:hh, :ww]
    torch.testing.assert_close(whole.double(), num / den, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------- skysense infer

WINDOW, OVERLAP = 64, 16


def _scene(path, h, w, nodata_box=True, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 255, (3, h, w), dtype=np.uint8)
    if nodata_box:
        arr[:, : h // 5, : w // 7] = 0
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=3,
        dtype="uint8",
        nodata=0,
        crs="EPSG:32631",
        transform=Affine(0.5, 0, 440000.0, 0, -0.5, 5000000.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as ds:
        ds.write(arr)
    return path


def _model_file(path, kind="segmentation", n_classes=3, **overrides):
    torch.manual_seed(0)
    enc = StandInSkySense(**overrides)
    inputs = _sensor_inputs({"hr": "hr_rgb"}, "hr")
    example = {"hr": torch.randn(1, 3, WINDOW, WINDOW)}
    model = build_task_model(enc, kind, "hr", n_classes, example, head_channels=8)
    meta = {
        "preset": "tiny",
        "overrides": overrides,
        "kind": kind,
        "source": "hr",
        "n_classes": n_classes,
        "channels": model.channels,
        "head": {"head_channels": 8} if kind != "classification" else {},
        "classes": [f"c{i}" for i in range(n_classes)],
        "inputs": inputs,
        "eval": {"window": WINDOW, "overlap": OVERLAP},
    }
    save_finetuned(path, model, meta)
    return model.eval(), meta


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(skysense.encoders, "build_skysense", build_standin, raising=False)


@pytest.mark.unit
def test_infer_writes_a_georeferenced_cog_equal_to_the_in_memory_blend(tmp_path, standin):
    src = _scene(tmp_path / "scene.tif", 150, 173)
    model, meta = _model_file(tmp_path / "m.pt")
    rep = run_inference(
        tmp_path / "m.pt", src, tmp_path / "out.tif", block=96, batch_size=4, progress=False
    )
    assert rep["windows"] == 3 * 4 and rep["blocks"] > 1
    with rasterio.open(src) as a, rasterio.open(tmp_path / "out.tif") as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert b.count == 1 and b.dtypes[0] == "uint8" and b.nodata == CLASS_NODATA
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        out = b.read(1)
        raw = a.read().astype(np.float32)
    assert (out[: 150 // 5, : 173 // 7] == CLASS_NODATA).all()  # input nodata stays nodata
    raw[:, (raw == 0).all(0)] = np.nan
    x, _ = normalise(raw, meta["inputs"]["hr"]["mean"], meta["inputs"]["hr"]["std"])
    prob = predict_scene(model, "segmentation", {"hr": x}, 150, 173, 3, WINDOW, OVERLAP, 4)
    ref = prob.argmax(0).numpy()
    valid = out != CLASS_NODATA
    assert valid.sum() > 0.9 * (150 * 173 - 30 * 24)
    np.testing.assert_array_equal(out[valid], ref[valid])
    with pytest.raises(FileExistsError, match="overwrite"):
        run_inference(tmp_path / "m.pt", src, tmp_path / "out.tif", progress=False)
    run_inference(
        tmp_path / "m.pt", src, tmp_path / "p.tif", output="probabilities", progress=False
    )
    with rasterio.open(tmp_path / "p.tif") as p:
        probs = p.read()
    assert probs.shape == (3, 150, 173) and np.isnan(probs[:, 0, 0]).all()
    np.testing.assert_allclose(np.nansum(probs, 0)[valid], 1.0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "out.tif", "p.tif", "scene.tif"]


@pytest.mark.unit
def test_infer_rejects_bad_requests(tmp_path, standin):
    src = _scene(tmp_path / "scene.tif", 40, 40)
    _model_file(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="src2 is for change detection"):
        run_inference(tmp_path / "m.pt", src, tmp_path / "o.tif", src2=src, progress=False)
    with pytest.raises(ValueError, match="'classes' or 'probabilities'"):
        run_inference(tmp_path / "m.pt", src, tmp_path / "o.tif", output="logits", progress=False)
    s2 = tmp_path / "s2.tif"
    with rasterio.open(
        s2,
        "w",
        driver="GTiff",
        height=8,
        width=8,
        count=2,
        dtype="uint16",
        crs="EPSG:32631",
        transform=Affine(10, 0, 0, 0, -10, 0),
    ) as ds:
        ds.write(np.ones((2, 8, 8), np.uint16))
    with pytest.raises(Exception, match="uint16 does not match sensor hr_rgb"):
        run_inference(tmp_path / "m.pt", s2, tmp_path / "o.tif", progress=False)
    assert not (tmp_path / "o.tif").exists()


# A process that runs `skysense infer` with the stand-in encoder.
_RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {here!r})
    import skysense.encoders
    from test_downstream_standin import build_standin
    skysense.encoders.build_skysense = build_standin
    from skysense.tasks import cli
    code = cli.main(["infer", *sys.argv[1:]])
    from skysense.tasks.downstream.infer import peak_rss_mb
    print("PEAK", peak_rss_mb())
    sys.exit(code)
    """
)


def _runner(tmp_path) -> Path:
    p = tmp_path / "runner.py"
    p.write_text(_RUNNER.format(here=str(HERE)))
    return p


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_scene(tmp_path):
    # A cheap model (per-window classes, a small stand-in): the pipeline's memory is measured.
    _model_file(tmp_path / "m.pt", "classification", hr_dims=(4, 4, 4, 4))
    runner = _runner(tmp_path)
    peaks = {}
    for side in (384, 1536):
        src = _scene(tmp_path / f"s{side}.tif", side, side, nodata_box=False)
        r = subprocess.run(
            [
                sys.executable,
                str(runner),
                str(src),
                str(tmp_path / f"o{side}.tif"),
                f"checkpoint={tmp_path / 'm.pt'}",
                "window=256",
                "overlap=32",
                "block=512",
                "progress=false",
                "batch_size=4",
                "threads=1",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        rep = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
        assert (rep["height"], rep["width"]) == (side, side)
        peaks[side] = float(
            next(line for line in r.stdout.splitlines() if line.startswith("PEAK")).split()[1]
        )
    # 16x the pixels. Holding the scene would add > 60 MB at 1536^2 (float32 input 28 MB,
    # class probabilities 28 MB, output 2 MB): the windowed run stays within noise.
    assert peaks[1536] - peaks[384] < 25, peaks


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_run_leaves_no_complete_looking_file(tmp_path, sig):
    _model_file(tmp_path / "m.pt", "classification", hr_dims=(4, 4, 4, 4))
    src = _scene(tmp_path / "big.tif", 1536, 1536, nodata_box=False)
    dst = tmp_path / "out" / "pred.tif"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(_runner(tmp_path)),
            str(src),
            str(dst),
            f"checkpoint={tmp_path / 'm.pt'}",
            "window=32",
            "overlap=8",
            "block=256",
            "progress=false",
            "batch_size=2",
            "threads=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if dst.parent.exists() and any(
                p.name.startswith(".pred.tif.partial") for p in dst.parent.iterdir()
            ):
                break
            time.sleep(0.1)
        assert proc.poll() is None, (
            "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        )
        time.sleep(1.0)  # well into the blocks
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not dst.exists()
    left = sorted(p.name for p in dst.parent.iterdir())
    if sig == signal.SIGTERM:
        assert left == [], left  # cleaned up on the way out
        assert "interrupted" in err
    else:
        assert all(n.startswith(".pred.tif.partial") for n in left), left


@pytest.mark.unit
def test_detection_infer_writes_boxes_in_the_scene_crs(tmp_path, standin):
    src = _scene(tmp_path / "scene.tif", 100, 150, nodata_box=False)
    torch.manual_seed(0)
    enc = StandInSkySense()
    model = build_task_model(
        enc, "detection", "hr", 1, {"hr": torch.randn(1, 3, 64, 64)}, fpn_channels=8
    )
    meta = {
        "preset": "tiny",
        "overrides": {},
        "kind": "detection",
        "source": "hr",
        "n_classes": 1,
        "channels": [8, 16, 24, 32],
        "head": {"fpn_channels": 8, "score_threshold": 0.0},
        "classes": ["tree"],
        "inputs": _sensor_inputs({"hr": "hr_rgb"}, "hr"),
        "eval": {"window": 64, "overlap": 16},
    }
    save_finetuned(tmp_path / "d.pt", model, meta)
    with pytest.raises(ValueError, match="geojson"):
        run_inference(tmp_path / "d.pt", src, tmp_path / "d.tif", progress=False)
    rep = run_inference(tmp_path / "d.pt", src, tmp_path / "d.geojson", progress=False)
    doc = json.loads((tmp_path / "d.geojson").read_text())
    assert doc["crs"]["properties"]["name"] == "EPSG:32631" and rep["windows"] == 2 * 3
    with rasterio.open(src) as ds:
        left, bottom, right, top = ds.bounds
    for f in doc["features"]:
        xs, ys = zip(*f["geometry"]["coordinates"][0])
        assert left <= min(xs) and max(xs) <= right and bottom <= min(ys) and max(ys) <= top
        assert f["properties"]["label"] == "tree"

"""`skysense finetune` / `evaluate` end to end on GeoTIFFs written here, with the contract
stand-in encoder (fast): HR segmentation (UperNet + auxiliary FCN) and multi-modal segmentation
(S2 + S1 + HR on the fused features) from GeoTIFF label masks, class-folder classification with
full fine-tuning and with linear probing. The real tiny preset runs in the integration tier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from omegaconf import OmegaConf
from test_downstream_standin import build_standin

import skysense.encoders
from skysense.tasks import cli
from skysense.tasks.downstream.run import evaluate, finetune

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    monkeypatch.setattr(skysense.encoders, "build_skysense", build_standin, raising=False)


def _tif(path, arr, res, dtype, x0=500000.0, y0=5000000.0, nodata=None):
    arr = np.asarray(arr).astype(dtype)
    arr = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=arr.shape[1],
        width=arr.shape[2],
        count=arr.shape[0],
        dtype=dtype,
        crs="EPSG:32633",
        transform=Affine(res, 0, x0, 0, -res, y0),
        nodata=nodata,
    ) as ds:
        ds.write(arr)
    return path.name


def _squares(rng, h, w, n=4, side=6):
    m = np.zeros((h, w), np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        m[y : y + side, x : x + side] = 1
    return m


def _hr_scene(root, name, rng, h=96, w=128):
    """Bright squares (class 1) on a dark textured background (class 0), 0.5 m pixels."""
    m = np.kron(_squares(rng, h // 4, w // 4), np.ones((4, 4), np.uint8))
    img = rng.integers(20, 90, (3, h, w)) + 140 * m[None]
    return {
        "name": name,
        "hr": _tif(root / f"{name}_hr.tif", img, 0.5, "uint8"),
        "mask": _tif(root / f"{name}_m.tif", m + 1, 0.5, "uint8"),
    }


def _cfg(overrides, command="finetune"):
    return cli.compose(cli.COMMANDS[command].config, overrides)


def _history_falls(m):
    loss = np.array([h["loss"] for h in m["history"]])
    k = max(1, len(loss) // 3)
    return loss[-k:].mean() < loss[:k].mean()


def test_hr_segmentation_from_geotiff_masks(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [_hr_scene(tmp_path, f"t{i}", rng) for i in range(3)]
    cfg = _cfg(
        [
            "task=segmentation",
            f"run_dir={tmp_path / 'run'}",
            f"data.root={tmp_path}",
            "data.crop=64",
            "data.classes=[background,square]",
            "data.label_values={1: 0, 2: 1}",
            "trainer.max_steps=12",
            "trainer.batch_size=4",
            "optim.lr=2e-3",
            "task.eval.window=64",
            "task.eval.overlap=16",
            "task.head.channels=8",
        ]
    )
    cfg.data.train_scenes = scenes[:2]
    cfg.data.val_scenes = scenes[2:]
    summary = finetune(cfg)
    m = json.loads((tmp_path / "run" / "random" / "metrics.json").read_text())
    assert _history_falls(m), [round(h["loss"], 3) for h in m["history"]]
    assert 0.5 < m["metrics"]["OA"] <= 1.0 and np.isfinite(m["metrics"]["mIoU"])
    assert np.array(m["metrics"]["confusion_matrix"]).sum() == 96 * 128
    assert summary["features"] == "hr" and "| random |" in summary["table"]
    # evaluate reads the model file and scores the same scene the same way.
    ecfg = _cfg(
        [
            "task=segmentation",
            f"run_dir={tmp_path / 'run'}",
            f"data.root={tmp_path}",
            "data.classes=[background,square]",
            "data.label_values={1: 0, 2: 1}",
        ],
        "evaluate",
    )
    ecfg.data.train_scenes = scenes[:2]
    ecfg.data.val_scenes = scenes[2:]
    res = evaluate(ecfg)
    assert res["metrics"]["confusion_matrix"] == m["metrics"]["confusion_matrix"]
    ecfg.data.classes = ["a", "b"]
    with pytest.raises(cli.ConfigError, match="trained on classes"):
        evaluate(ecfg)


def test_multimodal_segmentation_on_geo_features(tmp_path):
    rng = np.random.default_rng(1)
    scenes = []
    for i in range(3):
        m = _squares(rng, 16, 20, n=3, side=4).astype(np.int64)
        s2 = [
            _tif(
                tmp_path / f"s{i}_2020{d:02d}15_s2.tif",
                rng.integers(500, 1500, (10, 16, 20)) + 2000 * m,
                10,
                "uint16",
            )
            for d in (4, 7)
        ]
        s1 = [
            _tif(
                tmp_path / f"s{i}_20200610_s1.tif",
                rng.normal(-12, 2, (2, 16, 20)) + 6 * m,
                10,
                "float32",
            )
        ]
        hr = _tif(
            tmp_path / f"s{i}_hr.tif",
            np.kron(rng.integers(0, 255, (3, 16, 20)), np.ones((1, 8, 8))),
            1.25,
            "uint8",
        )
        mask = _tif(tmp_path / f"s{i}_m.tif", m, 10, "uint8")
        scenes.append({"name": f"s{i}", "s2": s2, "s1": s1, "hr": hr, "mask": mask})
    cfg = _cfg(
        [
            "task=multimodal_segmentation",
            f"run_dir={tmp_path / 'run'}",
            f"data.root={tmp_path}",
            "data.crop=8",
            "data.classes=[a,b]",
            "trainer.max_steps=4",
            "trainer.batch_size=2",
            "task.eval.window=8",
            "task.eval.overlap=4",
            "task.head.channels=16",
        ]
    )
    cfg.data.train_scenes = scenes[:2]
    cfg.data.val_scenes = scenes[2:]
    summary = finetune(cfg)
    # the task's default: F_out (fused + geo-context read-out), the scenes being georeferenced
    assert summary["features"] == "geo"
    m = json.loads((tmp_path / "run" / "random" / "metrics.json").read_text())
    assert np.array(m["metrics"]["confusion_matrix"]).sum() == 16 * 20
    model = torch.load(tmp_path / "run" / "random" / "model.pt", weights_only=True)
    inputs = model["meta"]["inputs"]
    assert inputs["modalities"] == ["hr", "s2", "s1"] and inputs["reference"] == "s2"


@pytest.mark.parametrize("probe", [False, True], ids=["finetune", "linear_probe"])
def test_class_folder_classification(tmp_path, probe):
    rng = np.random.default_rng(2)
    root = tmp_path / "scenes"
    for c, level in (("dark", 40), ("bright", 200)):
        (root / c).mkdir(parents=True)
        for i in range(5):
            _tif(
                root / c / f"{i}.tif",
                rng.integers(level - 30, level + 30, (3, 64, 64)),
                1.0,
                "uint8",
            )
    cfg = _cfg(
        [
            f"task={'linear_probe' if probe else 'classification'}",
            "data=class_folders",
            f"data.root={root}",
            "data.size=64",
            "data.val_fraction=0.4",
            f"run_dir={tmp_path / 'run'}",
            "trainer.max_steps=8",
            "trainer.batch_size=4",
            "optim.lr=3e-3",
        ]
    )
    summary = finetune(cfg)
    r = summary["runs"]["random"]
    assert summary["classes"] == ["bright", "dark"]
    assert r["loss_last"] < r["loss_first"]
    assert np.array(r["metrics"]["confusion_matrix"]).sum() == 4  # 2 held out per class
    assert (tmp_path / "run" / "random" / "confusion.png").stat().st_size > 5000


def test_task_and_data_must_fit(tmp_path):
    cfg = _cfg(["task=classification", "data=oscd", f"run_dir={tmp_path}", f"data.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no folder"):
        finetune(cfg)
    cfg = _cfg(["task=segmentation", "task.kind=regression", f"run_dir={tmp_path}"])
    with pytest.raises(cli.ConfigError, match="task.kind"):
        finetune(cfg)
    assert OmegaConf.select(_cfg(["task=change_detection"]), "data.name") == "oscd"
    assert OmegaConf.select(_cfg(["task=detection"]), "data.name") == "osbs"


@pytest.mark.slow
def test_timeseries_classification_on_the_embedded_sample(tmp_path):
    """Crop / land-cover classes from S2 series of different lengths (padded steps masked),
    read from the data package's manifest, on the fused features."""
    cfg = _cfg(
        [
            "task=timeseries_classification",
            f"data.root={tmp_path / 'embedded'}",
            "data.n_samples=12",
            "data.backend=torch",
            f"run_dir={tmp_path / 'run'}",
            "trainer.max_steps=4",
            "trainer.batch_size=4",
        ]
    )
    summary = finetune(cfg)
    assert summary["features"] == "fused" and summary["data_info"]["modalities"] == ["s2"]
    r = summary["runs"]["random"]
    assert np.array(r["metrics"]["confusion_matrix"]).sum() == summary["data_info"]["val"]
    assert len(summary["classes"]) >= 4


def test_geo_features_need_a_location():
    """features=geo reads F_out where the batch has a finite latlon, else the fused features."""
    from types import SimpleNamespace

    from skysense.tasks.downstream.fit import resolve_source

    task = OmegaConf.create({"features": "geo"})
    data = SimpleNamespace(inputs={"modalities": ["s2", "s1"]})
    assert resolve_source(task, data, {"latlon": torch.tensor([[45.0, 7.0]])}) == "geo"
    assert resolve_source(task, data, {"latlon": torch.tensor([[float("nan"), 7.0]])}) == "fused"
    assert resolve_source(task, data, {"s2": torch.zeros(1)}) == "fused"
    auto = OmegaConf.create({"features": "auto"})
    assert resolve_source(auto, data, {}) == "fused"

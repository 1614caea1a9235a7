"""Fine-tuning the real tiny preset on the real samples of ../shared/data, a few steps each:
change detection on OSCD (from a pre-training checkpoint and from random initialisation, in one
table), multi-label classification on BigEarthNet (S2, S1, S2+S1), detection on OSBS_029 with
its boxes; losses fall, metrics are computed, JSON and plots are written; `skysense evaluate`
reproduces the scores; `skysense infer` runs the change model over a whole city pair."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import torch

from skysense.encoders import build_skysense
from skysense.tasks import cli
from skysense.tasks.downstream.run import evaluate, finetune

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _cfg(overrides, command="finetune"):
    return cli.compose(cli.COMMANDS[command].config, overrides)


def _falls(history) -> bool:
    loss = np.array([h["loss"] for h in history])
    k = max(1, len(loss) // 3)
    return loss[-k:].mean() < loss[:k].mean()


def _check_run(run_dir, name, keys):
    m = json.loads((run_dir / name / "metrics.json").read_text())
    for k in keys:
        assert (
            k in m["metrics"] and m["metrics"][k] is not None and math.isfinite(m["metrics"][k])
        ), (k, m["metrics"])
    for png in m["metrics"]["plots"].values():
        assert png.endswith(".png") and (run_dir / name / png.split("/")[-1]).stat().st_size > 5000
    assert (run_dir / name / "loss.png").exists() and (run_dir / name / "model.pt").exists()
    assert _falls(m["history"]), [round(h["loss"], 4) for h in m["history"]]
    return m


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory):
    """A checkpoint in the pre-training format, from a freshly built tiny model."""
    torch.manual_seed(123)
    m = build_skysense("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    sd = m.state_dict()
    torch.save(
        {
            "student": sd,
            "teacher": sd,
            "config": {"model": {"preset": "tiny", "overrides": {}}},
            "step": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def oscd_run(shared_data, tmp_path_factory, pretrain_checkpoint):
    run_dir = tmp_path_factory.mktemp("oscd")
    cfg = _cfg(
        [
            "task=change_detection",
            f"data.root={shared_data / 'oscd'}",
            "data.val_cities=[rennes]",
            f"run_dir={run_dir}",
            f"checkpoint={pretrain_checkpoint}",
            "compare_random_init=true",
            "trainer.max_steps=24",
            "trainer.batch_size=6",
            "optim.warmup_steps=3",
            "task.eval.window=96",
            "task.eval.overlap=0",
        ]
    )
    return run_dir, finetune(cfg)


def test_change_detection_on_oscd_from_checkpoint_and_random(oscd_run, shared_data):
    run_dir, summary = oscd_run
    assert set(summary["runs"]) == {"pretrained", "random"}
    for name in ("pretrained", "random"):
        m = _check_run(run_dir, name, ("change_F1", "change_IoU", "OA"))
        cm = np.array(m["metrics"]["confusion_matrix"])
        assert cm.shape == (2, 2) and cm[1].sum() > 1000  # rennes' change pixels were scored
    assert summary["runs"]["pretrained"]["load_report"] == {
        "missing": [],
        "unexpected": [],
        "shape": [],
    }
    table = (run_dir / "summary.md").read_text()
    assert "| pretrained |" in table and "| random |" in table and "change_F1" in table
    info = summary["data_info"]
    train_cities = ["aguasclaras", "bercy", "bordeaux", "nantes"]
    assert {k: info[k] for k in ("train", "val")} == {"train": train_cities, "val": ["rennes"]}
    assert set(info) == {"train", "val", "counts", "holdout"}
    # the counts, against the label GeoTIFFs themselves (1 no change, 2 change)
    for split, cities in (("train", train_cities), ("val", ["rennes"])):
        masks = []
        for c in cities:
            with rasterio.open(shared_data / "oscd" / "labels" / c / "cm" / f"{c}-cm.tif") as ds:
                masks.append(ds.read(1))
        n = info["counts"][split]
        assert n["scenes"] == len(cities)
        assert n["pixels"] == sum(m.size for m in masks)
        assert n["change_pixels"] == sum(int((m == 2).sum()) for m in masks)
        assert 0.99 * n["pixels"] <= n["labelled_pixels"] <= n["pixels"]
        assert n["change_fraction"] == pytest.approx(n["change_pixels"] / n["labelled_pixels"])
    # one training city held out (task change_detection: trainer.val_fraction 0.25), where the
    # decision threshold was chosen
    held = info["holdout"]
    assert len(held["validation"]) == 1 and sorted(held["train"] + held["validation"]) == sorted(
        train_cities
    )
    for name in ("pretrained", "random"):
        thr = summary["runs"][name]["threshold"]
        assert thr["val_scenes"] == held["validation"] and 0.0 < thr["threshold"] < 1.0
        assert (run_dir / name / "pr_curve.png").is_file()


def test_evaluate_reproduces_the_scores(oscd_run, shared_data):
    run_dir, summary = oscd_run
    cfg = _cfg(
        [
            "task=change_detection",
            f"data.root={shared_data / 'oscd'}",
            "data.val_cities=[rennes]",
            f"run_dir={run_dir}",
            f"weights={run_dir / 'random' / 'model.pt'}",
        ],
        "evaluate",
    )
    res = evaluate(cfg)
    ref = summary["runs"]["random"]["metrics"]
    assert res["metrics"]["confusion_matrix"] == ref["confusion_matrix"]
    assert (run_dir / "evaluate" / "metrics.json").exists()


def test_infer_change_model_over_a_whole_city(oscd_run, shared_data, tmp_path):
    run_dir, _ = oscd_run
    city = shared_data / "oscd" / "images" / "rennes"
    dst = tmp_path / "rennes_change.tif"
    code = cli.main(
        [
            "infer",
            str(city / "imgs_1"),
            str(dst),
            f"checkpoint={run_dir / 'random' / 'model.pt'}",
            f"src2={city / 'imgs_2'}",
            "window=96",
            "overlap=16",
            "progress=false",
        ]
    )
    assert code == 0
    b02 = next((city / "imgs_1").glob("*B02.tif"))
    with rasterio.open(b02) as a, rasterio.open(dst) as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert b.shape[1] > 96 * 5  # larger than one window
        classes = set(np.unique(b.read(1)).tolist())
    assert classes <= {0, 1, 255}


@pytest.mark.parametrize("mods", [["s2"], ["s1"], ["s2", "s1"]], ids=["S2", "S1", "S2+S1"])
def test_multilabel_bigearthnet(shared_data, tmp_path, mods):
    cfg = _cfg(
        [
            "task=multilabel_classification",
            f"data.root={shared_data / 'bigearthnet'}",
            f"data.modalities=[{','.join(mods)}]",
            "data.crop=32",
            f"run_dir={tmp_path}",
            "trainer.max_steps=8",
            "trainer.batch_size=4",
        ]
    )
    summary = finetune(cfg)
    assert summary["features"] == (mods[0] if len(mods) == 1 else "fused")
    m = _check_run(tmp_path, "random", ("mAP", "mAP_micro"))
    assert len(m["metrics"]["per_class_AP"]) == len(summary["classes"]) > 5


def test_detection_on_osbs(shared_data, tmp_path):
    cfg = _cfg(
        [
            "task=detection",
            f"data.root={shared_data / 'hr_rgb'}",
            f"run_dir={tmp_path}",
            "trainer.max_steps=30",
            "trainer.batch_size=2",
        ]
    )
    summary = finetune(cfg)
    m = _check_run(tmp_path, "random", ("mAP50", "mAP50_voc"))
    assert m["metrics"]["n_ground_truth"] == 21  # the held-out third of the tile's 61 boxes
    assert summary["classes"] == ["Tree"]

"""`skysense benchmark` end to end on a tiny generated patch (the eo-learn Slovenia layout):
report files, per-run config / log / result, statistics consistent with the runs, entries that
cannot run listed with their reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from skysense.tasks.benchmark import stats
from skysense.tasks.cli import main
from tests.conftest import run_benchmark

pytestmark = pytest.mark.unit


def fake_slovenia(root, h=24, w=24, seed=0):
    """REFERENCE_SCENES.npy (5, h, w, 13) reflectance and LULC.npy (h, w, 1): two classes
    (forest 2 left, grassland 3 right) whose red band differs, so the spectral baseline separates
    them; code 0 (no data) in one corner."""
    rng = np.random.default_rng(seed)
    lulc = np.full((h, w), 2, np.uint16)
    lulc[:, w // 2 :] = 3
    lulc[:3, :3] = 0
    img = rng.uniform(0.02, 0.3, (5, h, w, 13)).astype(np.float32)
    img[..., 3] = np.where(lulc == 3, 0.25, 0.05)[None] + rng.normal(0, 0.01, (5, h, w))
    (root / "TestEOPatch" / "mask_timeless").mkdir(parents=True)
    np.save(root / "REFERENCE_SCENES.npy", img)
    np.save(root / "TestEOPatch" / "mask_timeless" / "LULC.npy", lulc[..., None])
    return root


def test_benchmark_suite_end_to_end(tmp_path):
    root = fake_slovenia(tmp_path / "slovenia")
    entry = f"{{data: eolearn_slovenia, task: pixels, features: s2, window: 32, data_args: {{root: '{root}', block: 4, min_pixels: 10}}"
    suite = ",".join(
        [
            entry + ", protocol: linear_probe}",
            entry + ", protocol: knn, label_fraction: 0.5}",
            "{data: eolearn_slovenia, task: segmentation, protocol: frozen_upernet_ltae, "
            f"data_args: {{root: '{root}', block: 4, min_pixels: 10, crop: 16}}, "
            "eval_every: 1, patience: 1, overrides: ['trainer.max_steps=3', 'trainer.batch_size=2', "
            "'task.eval.window=16', 'task.eval.overlap=0', 'task.features=s2']}",
            "{data: oscd, task: change_detection, protocol: linear_probe, "
            f"data_args: {{root: '{tmp_path / 'absent'}'}}}}",
        ]
    )
    out = tmp_path / "run"
    rep = run_benchmark(out, suite, "tiny", "seeds=[0,1]", "n_boot=500",
                        "entry_defaults.l2_grid=[1e-3,1e-1]")  # fmt: skip
    for ext in ("md", "json", "png"):
        assert (out / f"report.{ext}").stat().st_size > 0
    assert rep["models"] == ["random init", "spectral", "unet"]
    assert set(rep["entries"][0]["models"]) == {"random init", "spectral"}  # no U-Net beside probes
    assert rep["note"].startswith("no checkpoints given")
    ok, ltae, absent = rep["entries"][0], rep["entries"][2], rep["entries"][3]
    assert ok["id"] == "eolearn_slovenia/pixels/linear_probe"
    assert rep["entries"][1]["id"] == "eolearn_slovenia/pixels/knn@0.5"
    # the series through L-TAE (frozen encoder per date, UperNet), the U-Net beside it; early
    # stopping on a held-out group of training blocks, the best step reported
    assert ltae["status"] == "ok" and set(ltae["models"]) == {"random init", "spectral", "unet"}
    for model in ("random init", "unet"):
        for r in ltae["models"][model]["runs"]:
            assert "error" not in r, r["error"]
            assert r["metric"] == "mIoU" and 0.0 <= r["score"] <= 1.0
            assert r["best_step"] in [e["step"] for e in r["val_curve"]]
            assert len(r["data_info"]["holdout"]["validation"]) == 1  # of 4 block groups
        assert ltae["models"][model]["summary"]["stop"].startswith(("early", "budget"))
    assert absent["status"] == "data absent"
    for model in ("random init", "spectral"):
        runs = ok["models"][model]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        s = ok["models"][model]["summary"]
        vals = [r["score"] for r in runs]
        assert s["metric"] == "mIoU"
        assert s["mean"] == pytest.approx(np.mean(vals))
        assert s["iqm"] == pytest.approx(stats.iqm(vals))
        assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
        run_dir = out / "runs" / "eolearn_slovenia__pixels__linear_probe" / model.replace(" ", "_")
        for seed in (0, 1):
            for f in ("config.yaml", "run.log", "result.json"):
                assert (run_dir / f"seed{seed}" / f).is_file()
        assert "seed 0" in (run_dir / "seed0" / "run.log").read_text()
    # the red band separates the two classes: the spectral baseline's linear probe finds it
    assert ok["models"]["spectral"]["summary"]["mean"] > 0.9
    assert ok["models"]["spectral"]["runs"][0]["plateaued"] is True
    # normalised against random init on the same entry
    ref = ok["models"]["random init"]["summary"]["mean"]
    spec = ok["models"]["spectral"]["summary"]
    if ref < 1:
        assert spec["normalised"] == pytest.approx((spec["mean"] - ref) / (1 - ref))
        assert rep["normalised"]["random init"]["mean"] == pytest.approx(0.0, abs=1e-12)
    else:  # random init already perfect: nothing to normalise by (NaN, written as null)
        assert spec["normalised"] is None
        assert (
            "eolearn_slovenia/pixels/linear_probe" not in rep["normalised"]["spectral"]["entries"]
        )
    md = (out / "report.md").read_text()
    assert "| eolearn_slovenia/pixels/linear_probe | spectral | mIoU |" in md
    assert "data absent" in md and "eolearn_slovenia/segmentation/frozen_upernet_ltae" in md
    assert all(not math.isnan(r["score"]) for r in ok["models"]["spectral"]["runs"])


def test_pangaea_suite_on_fake_hls_burn_scars(tmp_path):
    """The pangaea suite's HLS entries (frozen encoder + UperNet through the fine-tuning path,
    the 10 % linear probe on per-pixel features) with roots from config, on a fake in the
    distributed layout; the suite's other entries are absent or not implemented."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    import fakes

    datasets = tmp_path / "datasets"
    fakes.make("hls_burn_scars", datasets / "hls_burn_scars")
    out = tmp_path / "run"
    small = ["'trainer.max_steps=2'", "'trainer.batch_size=2'", "'task.eval.window=32'",
             "'task.eval.overlap=0'", "'data.crop=16'"]  # fmt: skip
    # The suite's budget: 80 epochs with early stopping (PANGAEA); here 2 steps, no stopping.
    tiny = [f"suite.entries.{i}.{k}" for i in (0, 1) for k in ("epochs", "eval_every", "patience")]
    rc = main(["benchmark", "suite=pangaea", f"run_dir={out}", f"datasets_root={datasets}",
               "seeds=[0]", "n_boot=200", "baselines=[spectral,unet]",
               "entry_defaults.l2_grid=[1e-2]", "entry_defaults.window=32",
               *[f"{k}=null" for k in tiny],
               f"suite.entries.0.overrides=[{','.join(small)}]",
               f"suite.entries.1.overrides=[{','.join(small)}]"])  # fmt: skip
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    by_id = {r["id"]: r for r in rep["entries"]}
    # the 10 % limited-label variant of the frozen protocol ran on a tenth of the tiles
    few = by_id["hls_burn_scars/segmentation/frozen_upernet@0.1"]
    assert few["status"] == "ok"
    assert few["models"]["random init"]["runs"][0]["label_fraction"] == 0.1
    few_info = few["models"]["random init"]["runs"][0]["data_info"]
    assert few_info["holdout"]["label_fraction"] == 0.1
    assert few_info["holdout"]["train"] < few_info["train"]  # trained on fewer tiles than exist
    fro = by_id["hls_burn_scars/segmentation/frozen_upernet"]
    assert "holdout" not in fro["models"]["random init"]["runs"][0]["data_info"]  # all tiles
    lp = by_id["hls_burn_scars/segmentation/linear_probe@0.1"]
    assert fro["status"] == "ok" and lp["status"] == "ok"
    run = fro["models"]["random init"]["runs"][0]
    assert run["metric"] == "mIoU" and 0.0 <= run["score"] <= 1.0
    assert run["steps"] == 2
    assert run["per_scene"]  # per-scene scores of the dense evaluation (as the probes')
    unet = fro["models"]["unet"]["runs"][0]  # the U-Net from scratch, same crops and steps
    assert unet["metric"] == "mIoU" and 0.0 <= unet["score"] <= 1.0 and unet["steps"] == 2
    assert "unet" not in lp["models"]  # no U-Net row beside a probe
    probe = lp["models"]["random init"]["runs"][0]
    assert probe["metric"] == "mIoU" and probe["n_train"] > 0
    assert by_id["mados/segmentation/frozen_upernet"]["status"] == "data absent"
    assert by_id["oscd/change_detection/siamese"]["status"] == "data absent"
    assert by_id["pastis/multimodal_segmentation/frozen_upernet_ltae"]["status"] == "data absent"
    # no early stopping asked for: the runs used their budget; the table says so
    assert run["stop"] == "budget" and run["best_step"] is None
    assert fro["models"]["random init"]["summary"]["stop"] == "budget"
    assert "| stop |" in (out / "report.md").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_shared_oscd_change_probe_threshold_on_validation(shared_data, tmp_path):
    """OSCD change at frozen per-pixel features: the threshold chosen on a held-out training
    city at its true change rate (the precision/recall curve kept), per-city test scores."""
    entry = ("{data: oscd, task: change_detection, protocol: linear_probe, features: s2, "
             "val_fraction: 0.25, pixels_per_scene: 300, max_test_pixels: 20000, "
             f"data_args: {{root: '{shared_data / 'oscd'}'}}}}")  # fmt: skip
    rep = run_benchmark(tmp_path / "run", entry, "oscd", "seeds=[0]", "n_boot=200",
                        "entry_defaults.l2_grid=[1e-2]")  # fmt: skip
    rec = rep["entries"][0]
    assert rec["status"] == "ok"
    for model in ("random init", "spectral"):
        run = rec["models"][model]["runs"][0]
        assert run["metric"] == "change_F1" and not math.isnan(run["score"])
        assert set(run["per_scene"]) == {"paris", "rennes"}
        curve = run["val_pr_curve"]
        assert len(curve["threshold"]) == len(curve["precision"]) == 101
        assert 0.0 < run["scores"]["threshold"] < 1.0
        # fitted on balanced pixels, thresholded at the true rate: no flood of false changes
        assert run["scores"]["predicted_change_share"] < 0.10
        assert run["n_val"] > 0 and run["n_train"] > run["n_val"]


def test_unet_baseline_shapes():
    import torch

    from skysense.tasks.benchmark.unet import UNet

    s2 = torch.randn(2, 3, 10, 13, 15)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    seg = UNet(10, 4, "s2", change=False, width=8)
    out = seg({"s2": s2, "s2_valid": valid})["logits"]
    assert out.shape == (2, 4, 13, 15)  # odd sides padded inside, cropped back
    # a padded step does not change the input: zeroing it leaves the logits as they were
    s2b = s2.clone()
    s2b[0, 2] = 0
    seg.eval()
    assert torch.allclose(seg({"s2": s2, "s2_valid": valid})["logits"],
                          seg({"s2": s2b, "s2_valid": valid})["logits"])  # fmt: skip
    chg = UNet(10, 2, "s2", change=True, width=8)
    pair = {"t1": {"s2": s2[:, :1]}, "t2": {"s2": s2[:, 1:2]}}
    out = chg(pair)["logits"]
    assert out.shape == (2, 2, 13, 15)
    out.sum().backward()
    assert chg.enc1[0].weight.grad.abs().sum() > 0


def test_suite_pretrained_row_pretrains_once_then_reuses(tmp_path):
    """suite.pretrained (suite=quick's pre-trained tiny row): without checkpoints, the benchmark
    pre-trains in its run folder when that holds no finished run, then reuses the finished run
    (nothing retrained or overwritten) and puts its newest checkpoint beside random init."""
    pre = tmp_path / "pretrain"
    args = ["benchmark", "suite.name=q", "suite.entries=[{data: embedded, task: classification, "
            "protocol: knn, cv_folds: 2}]", "suite.pretrained.name=tiny2",
            f"suite.pretrained.run_dir={pre}", "suite.pretrained.overrides=['trainer.max_steps=2',"
            "'trainer.batch_size=2','trainer.linear_probe=false','trainer.health_every=0']",
            "seeds=[0]", "n_boot=100", "baselines=[]"]  # fmt: skip
    assert main([*args, f"run_dir={tmp_path / 'a'}"]) == 0
    ckpt = pre / "checkpoints" / "step_0000002.pt"
    stamp = ckpt.stat().st_mtime_ns
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["models"] == ["tiny2", "random init"]
    assert rep["checkpoints"] == {"tiny2": str(ckpt)}
    assert rep["entries"][0]["models"]["tiny2"]["runs"][0]["score"] >= 0.0
    assert main([*args, f"run_dir={tmp_path / 'b'}"]) == 0
    assert ckpt.stat().st_mtime_ns == stamp  # the finished run reused, not trained again
    # checkpoints given: no pre-training
    other = tmp_path / "other"
    assert main([*args[:4], f"suite.pretrained.run_dir={other}", *args[5:],
                 f"run_dir={tmp_path / 'c'}", f"checkpoints={{x: {ckpt}}}"]) == 0  # fmt: skip
    assert not other.exists()


def test_epoch_budget_counts_the_samples_left_after_the_carve(tmp_path):
    """epochs are passes over what the run trains on: with a validation share and a label
    fraction the budget shrinks with them (the 10 % label entries of suite pangaea got the full
    data set's steps before)."""
    from omegaconf import OmegaConf

    from skysense.tasks.benchmark.protocols import budget_steps
    from skysense.tasks.cli import compose

    entry = OmegaConf.create({"epochs": 2, "min_steps": 1, "max_steps": 100000})
    cfg = compose("finetune", ["data=embedded", f"data.root={tmp_path / 'embedded'}",
                               "trainer.batch_size=1"])  # fmt: skip
    full = budget_steps(entry, cfg, 0)
    cfg.trainer.val_fraction, cfg.trainer.label_fraction = 0.25, 0.5
    assert full > 0 and budget_steps(entry, cfg, 0) == 2 * round(full / 2 * 0.75 * 0.5)

"""Fine-tuning's validation split (carved from the training data), label fractions, early
stopping with patience, the multi-step lr schedule, and change detection's decision threshold
chosen on the validation split (saved with the model, used by evaluate and infer)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_downstream_standin import build_standin
from torch import nn

import skysense.encoders
from skysense.tasks import cli
from skysense.tasks.downstream.fit import lr_schedule
from skysense.tasks.downstream.holdout import carve, choose
from skysense.tasks.downstream.run import evaluate, finetune
from skysense.tasks.downstream.trainer import EarlyStopping, train
from skysense.tasks.errors import ConfigError
from skysense.tasks.training.schedules import multistep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import fakes  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    monkeypatch.setattr(skysense.encoders, "build_skysense", build_standin, raising=False)


def test_multistep_schedule():
    lrs = [multistep(s, 100, 1e-4) for s in range(100)]
    assert lrs[0] == lrs[59] == pytest.approx(1e-4)
    assert lrs[60] == lrs[89] == pytest.approx(1e-5)
    assert lrs[90] == lrs[99] == pytest.approx(1e-6)
    # warm-up first, then the steps; milestones are shares of the total
    assert multistep(0, 10, 1.0, (0.5,), 0.5, warmup=2) == pytest.approx(0.5)
    assert [multistep(s, 10, 1.0, (0.5,), 0.5) for s in (4, 5)] == [1.0, 0.5]
    o = OmegaConf.create({"schedule": "multistep", "milestones": [0.6, 0.9], "gamma": 0.1,
                         "warmup_steps": 0})  # fmt: skip
    fn = lr_schedule(o, 50, 2e-4)
    assert fn(29) == pytest.approx(2e-4) and fn(30) == pytest.approx(2e-5)
    assert lr_schedule(OmegaConf.create({"schedule": "cosine"}), 50, 1.0) is None
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_schedule(OmegaConf.create({"schedule": "poly"}), 50, 1.0)


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, batch):
        return {"logits": self.lin(batch["x"])}


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=g), "label": torch.tensor([0, 1, 0, 1])}
            for _ in range(n)]  # fmt: skip


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights():
    from skysense.tasks.downstream.losses import TaskLoss

    torch.manual_seed(0)
    model = _Lin()
    scores = iter([0.2, 0.6, 0.5, 0.55, 0.9, 0.95])
    snapshots = {}

    def score(m):
        snapshots[len(snapshots) + 1] = m.lin.weight.detach().clone()
        return next(scores)

    stopper = EarlyStopping(score, every=2, patience=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hist = train(model, TaskLoss("classification"), "classification", _batches(20), opt, 20,
                 0.5, stopper=stopper, lr_fn=lambda s: 0.5)  # fmt: skip
    # evaluations at steps 2, 4, 6, 8: the best (0.6) at step 4, then two without improvement
    assert [e["step"] for e in stopper.evals] == [2, 4, 6, 8]
    assert len(hist) == 8 and all(h["lr"] == 0.5 for h in hist)
    rec = stopper.record(len(hist), 20)
    assert rec["best_step"] == 4 and rec["best_val"] == pytest.approx(0.6)
    assert rec["stopped_early"] is True and rec["steps_run"] == 8
    assert torch.equal(model.lin.weight, snapshots[2])  # the weights scored at step 4
    assert not torch.equal(snapshots[4], snapshots[2])  # and they had moved on since
    # without patience: the whole budget, the best weights still restored
    stopper = EarlyStopping(lambda m: 0.0, every=5)
    hist = train(model, TaskLoss("classification"), "classification", _batches(10), opt, 10,
                 0.5, stopper=stopper)  # fmt: skip
    assert len(hist) == 10 and stopper.record(10, 10)["stopped_early"] is False
    assert stopper.best_step == 5


def test_choose_is_seeded_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 4)
    keep, val = choose(len(labels), 0.25, 0.5, seed=3, labels=labels)
    assert not set(keep) & set(val)
    counts = lambda idx: torch.bincount(labels[idx], minlength=3).tolist()  # noqa: E731
    assert counts(val) == [2, 5, 1]  # a quarter of each class (rounded), at least one
    assert counts(keep) == [4, 8, 2]  # half of each class's remaining items
    assert choose(len(labels), 0.25, 0.5, 3, labels) == (keep, val)
    assert choose(len(labels), 0.25, 0.5, 4, labels) != (keep, val)
    keep, val = choose(4, 0.25, 1.0, seed=0)  # scenes: whole items, at least one each way
    assert len(val) == 1 and len(keep) == 3
    assert choose(1, 0.5, 1.0, 0) == ([0], [])  # one item: no validation (a warning)


def test_label_fraction_and_validation_of_class_folders(tmp_path):
    """Images stratified by class: validation and kept training items come from each class."""
    from test_downstream_finetune import _tif

    from skysense.tasks.downstream.data import build_task_data

    rng = np.random.default_rng(0)
    root = tmp_path / "scenes"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            _tif(root / c / f"{i}.tif", rng.integers(0, 255, (3, 16, 16)), 1.0, "uint8")
    cfg = cli.compose(cli.COMMANDS["finetune"].config, [
        "task=classification", "data=class_folders", f"data.root={root}", "data.size=16",
        "data.val_fraction=0.2", f"run_dir={tmp_path}"])  # fmt: skip
    data = build_task_data(cfg.data, 8, 0, None)
    n_train = len(data.train.ds)
    tr, val = carve(data, cfg.data, 8, 0, None, 0.25, 0.5)
    h = tr.info["holdout"]
    assert h["stratified"] and h["unit"] == "images"
    assert len(val.eval) == h["validation"] == 4  # a quarter of each class's 8
    assert len(tr.train.ds) == h["train"] == 6  # half of each class's remaining 6
    assert n_train == 16
    names = lambda ds: {str(it["path"]) for it in ds.items}  # noqa: E731
    assert not names(val.eval) & names(tr.train.ds)
    assert sorted(it["label"] for it in tr.train.ds.items) == [0, 0, 0, 1, 1, 1]
    assert len(tr.train) == 8  # the training stream keeps its length (steps x batch)


def test_change_detection_threshold_on_validation_early_stopping(tmp_path):
    """Plain `skysense finetune task=change_detection`: one training city held out, early
    stopping on it, the threshold of best F1 there saved with the model; evaluate reuses it."""
    root = fakes.make("oscd", tmp_path / "oscd")
    run = tmp_path / "run"
    base = ["task=change_detection", f"data.root={root}", "data.train_cities=null",
            "data.val_cities=null", "task.eval.window=32", "task.eval.overlap=0"]  # fmt: skip
    cfg = cli.compose(cli.COMMANDS["finetune"].config, [
        *base, f"run_dir={run}", "trainer.max_steps=8", "trainer.batch_size=2", "trainer.eval_every=2",
        "trainer.patience=1", "optim.schedule=multistep", "optim.warmup_steps=0"])  # fmt: skip
    summary = finetune(cfg)
    r = summary["runs"]["random"]
    info = summary["data_info"]
    assert info["holdout"]["validation"] == r["threshold"]["val_scenes"]
    assert len(info["holdout"]["validation"]) == 1 and len(info["holdout"]["train"]) == 1
    es = r["early_stopping"]
    vals = [e["val"] for e in es["evals"]]
    assert es["best_step"] == es["evals"][int(np.nanargmax(vals))]["step"]
    assert r["steps"] == es["steps_run"] <= 8
    # patience 1: never more than one evaluation after the best; an early stop is that one
    after = [e["step"] for e in es["evals"] if e["step"] > es["best_step"]]
    assert len(after) <= 1
    if es["stopped_early"]:
        assert after == [es["evals"][-1]["step"]] and es["evals"][-2]["step"] == es["best_step"]
    t = r["threshold"]["threshold"]
    assert 0.0 < t < 1.0 and r["metrics"]["threshold"] == pytest.approx(t)
    curve = json.loads((run / "random" / "pr_curve.json").read_text())
    assert len(curve["val_pr_curve"]["precision"]) == 101 and curve["threshold"] == t
    assert (run / "random" / "pr_curve.png").stat().st_size > 2000
    meta = torch.load(run / "random" / "model.pt", weights_only=True)["meta"]
    assert meta["threshold"] == pytest.approx(t)
    assert "best" in summary["table"] and "threshold chosen on the validation" in summary["table"]
    res = evaluate(cli.compose(cli.COMMANDS["evaluate"].config, [*base, f"run_dir={run}"]))
    assert res["metrics"]["threshold"] == pytest.approx(t)
    assert res["metrics"]["confusion_matrix"] == r["metrics"]["confusion_matrix"]
    # infer: classes are P(change) >= the saved threshold, not the argmax
    import rasterio

    city = root / "images" / "paris"
    common = [f"checkpoint={run / 'random' / 'model.pt'}", f"src2={city / 'imgs_2'}",
              "window=32", "overlap=0", "progress=false", "check_sensor=false"]  # fmt: skip
    assert cli.main(["infer", str(city / "imgs_1"), str(tmp_path / "c.tif"), *common]) == 0
    assert cli.main(["infer", str(city / "imgs_1"), str(tmp_path / "p.tif"), *common,
                     "output=probabilities"]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "p.tif") as pr:
        cls, p1 = c.read(1), pr.read(2)
    ok = np.isfinite(p1)
    assert ok.sum() > 100 and t != pytest.approx(0.5)
    np.testing.assert_array_equal(cls[ok], (p1[ok] >= t).astype(np.uint8))
    lo, hi = min(t, 0.5), max(t, 0.5)
    assert (ok & (p1 >= lo) & (p1 < hi)).any()  # pixels where the argmax would differ
    # eval_every without a validation split is a config error
    cfg = cli.compose(cli.COMMANDS["finetune"].config, [
        *base, f"run_dir={tmp_path / 'r2'}", "trainer.val_fraction=0", "trainer.eval_every=2",
        "trainer.max_steps=2", "trainer.batch_size=2"])  # fmt: skip
    with pytest.raises(ConfigError, match="trainer.eval_every"):
        finetune(cfg)


def test_validation_loss_metric():
    from skysense.tasks.downstream.validation import mean_loss, score_fn

    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert mean_loss("classification", p, torch.tensor([0, 1])) == pytest.approx(
        -(math.log(0.5) + math.log(0.1)) / 2
    )
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    want = -(math.log(0.5) + math.log(0.5) + math.log(0.1) + math.log(0.9)) / 4
    assert mean_loss("multilabel", p, y) == pytest.approx(want)
    cfg = OmegaConf.create({"task": {"eval": {}}, "trainer": {"eval_batch_size": 2}})
    with pytest.raises(NotImplementedError, match="image tasks"):
        score_fn("segmentation", None, cfg, "cpu", "loss")
    with pytest.raises(ValueError, match="score or loss"):
        score_fn("classification", None, cfg, "cpu", "acc")


def test_detection_holdout_and_early_stopping_on_rotated_map(tmp_path):
    """DIOR-R (oriented boxes): whole images held out for validation, a label fraction of the
    rest trained on, early stopping on the validation rotated-box mAP50."""
    root = fakes.make("dior_r", tmp_path / "dior_r")
    run = tmp_path / "run"
    cfg = cli.compose(cli.COMMANDS["finetune"].config, [
        "task=detection", "data=dior_r", f"data.root={root}", "data.crop=64", f"run_dir={run}",
        "trainer.max_steps=4", "trainer.batch_size=1", "trainer.val_fraction=0.34",
        "trainer.label_fraction=0.5", "trainer.eval_every=2", "trainer.patience=5"])  # fmt: skip
    summary = finetune(cfg)
    h = summary["data_info"]["holdout"]
    n = summary["data_info"]["train"]
    assert h["unit"] == "images" and h["validation"] == max(1, round(0.34 * n))
    assert h["train"] == max(1, round(0.5 * (n - h["validation"])))
    es = summary["runs"]["random"]["early_stopping"]
    assert [e["step"] for e in es["evals"]] == [2, 4]
    assert all(0.0 <= e["val"] <= 1.0 for e in es["evals"])

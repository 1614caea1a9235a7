"""`skysense export`: the tiny preset with a classification and a segmentation head through
torch.export (saved, reloaded, compared with eager on fresh inputs) and ONNX where the exporter
takes it; the check fails when the program and eager differ."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_downstream_standin import StandInSkySense

from skysense.encoders import build_skysense
from skysense.tasks.downstream import export as E
from skysense.tasks.downstream.data import _sensor_inputs
from skysense.tasks.downstream.model import build_task_model

HAVE_ONNX = all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(kind, sensors, ref, window):
    return {"kind": kind, "inputs": _sensor_inputs(sensors, ref), "eval": {"window": window}}


@pytest.mark.slow
def test_tiny_classification_head_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = build_skysense("tiny")
    meta = _meta("classification", {"s2": "s2_l2a"}, "s2", 32)
    names = E.input_names("classification", ["s2"])
    assert names == ["s2", "s2_doy", "s2_valid"]
    ex = dict(zip(names, E.example_inputs(names, meta["inputs"], 32, steps=3)))
    model = build_task_model(enc, "classification", "fused", 6, ex)
    rep = E.export_model(model, meta, tmp_path, size=32, steps=3, onnx=HAVE_ONNX)
    assert rep["torch_export_ok"] and rep["torch_export_check"]["shape"] == [1, 6]
    assert rep["inputs"]["s2"][0] == [1, 3, 10, 32, 32]
    assert json.loads((tmp_path / "export.json").read_text())["torch_export_ok"]
    # The saved program runs on its own (a fresh load, no model code).
    prog = torch.export.load(tmp_path / "model.pt2").module()
    x = E.example_inputs(
        names, meta["inputs"], 32, steps=3, generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            prog(*x), E.ExportWrapper(model.eval(), "classification", names)(*x)
        )
    if HAVE_ONNX:
        assert rep["onnx_ok"], rep
        assert rep["onnx_check"]["max_abs"] < 1e-4


@pytest.mark.slow
def test_tiny_segmentation_head_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = build_skysense("tiny")
    meta = _meta("segmentation", {"hr": "hr_rgb"}, "hr", 64)
    model = build_task_model(
        enc, "segmentation", "hr", 4, {"hr": torch.randn(1, 3, 64, 64)}, head_channels=16
    )
    # ONNX through the Swin V2 window attention (the classification test covers the ViT).
    rep = E.export_model(model, meta, tmp_path, onnx=HAVE_ONNX)
    assert rep["torch_export_ok"] and rep["torch_export_check"]["shape"] == [1, 4, 64, 64]
    assert rep["torch_export_check"]["max_abs"] <= 1e-4
    if HAVE_ONNX:
        assert rep["onnx_ok"], rep
        assert rep["onnx_check"]["max_abs"] < 1e-4


@pytest.mark.unit
def test_the_check_fails_when_the_program_differs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    meta = _meta("segmentation", {"hr": "hr_rgb"}, "hr", 32)
    ex = {"hr": torch.randn(1, 3, 32, 32)}
    model = build_task_model(StandInSkySense(), "segmentation", "hr", 3, ex, head_channels=8)
    other = build_task_model(StandInSkySense(), "segmentation", "hr", 3, ex, head_channels=8)
    wrong = torch.export.export(E.ExportWrapper(other.eval(), "segmentation", ["hr"]), (ex["hr"],))
    monkeypatch.setattr(torch.export, "load", lambda path: wrong)
    with pytest.raises(AssertionError, match="differs from eager"):
        E.export_model(model, meta, tmp_path, onnx=False)
    assert json.loads((tmp_path / "export.json").read_text())["torch_export_ok"] is False


@pytest.mark.unit
def test_detection_export_is_refused_clearly(tmp_path):
    with pytest.raises(NotImplementedError, match="detection"):
        E.export_model(torch.nn.Identity(), {"kind": "detection", "inputs": {}}, tmp_path)

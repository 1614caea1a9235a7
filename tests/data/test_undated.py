"""Undated imagery (issue 15): most classification datasets carry no acquisition date. A single
image of unknown date is ingested as a valid sample whose day of year is 0, which the encoder's
DTPE encodes as a zero row; a series with an undated step is refused file by file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine

from skysense.data import build_loader, io
from skysense.data.batch import validate_batch
from skysense.data.ingest import IngestConfig, ingest
from skysense.data.manifest import Manifest
from skysense.data.sensors import S2_MODEL_BANDS

pytestmark = pytest.mark.unit

UTM = "EPSG:32631"
T = Affine(10, 0, 440_000.0, 0, -10, 4_850_000.0)


def _stack(path: Path, value: int = 900) -> Path:
    rng = np.random.default_rng(value)
    a = (value + rng.integers(0, 300, (10, 24, 24))).astype(np.uint16)
    return io.write_geotiff(path, a, crs=UTM, transform=T, band_names=list(S2_MODEL_BANDS))


def test_an_undated_image_is_a_sample_of_unknown_date(tmp_path):
    for i in range(3):  # EuroSAT-like: one undated S2 stack per place, no date anywhere
        _stack(tmp_path / "src" / f"patch_{i}" / f"AnnualCrop_{i}.tif", 800 + 50 * i)
    rep = ingest(tmp_path / "src", tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    assert rep.ok and not rep.bad_files, rep.format()
    m = Manifest(rep.manifest)
    rows = m.query("SELECT s2_dates FROM samples")
    assert len(rows) == 3 and {r[0] for r in rows} == {""}  # recorded as unknown
    (days,) = {r[0] for r in m.query("SELECT days FROM acquisitions WHERE modality='s2'")}
    assert days is None
    batch = next(iter(build_loader(rep.manifest, None, 3, backend="torch", shuffle=False)))
    assert batch["s2_valid"].all() and (batch["s2_doy"] == 0).all()
    validate_batch(batch)  # a valid step of unknown date is in the contract
    from skysense.encoders import build_skysense

    torch.manual_seed(0)
    enc = build_skysense("tiny", modalities=("s2",)).eval()
    with torch.no_grad():
        out = enc({k: v for k, v in batch.items() if k.startswith("s2")})
        # The unknown date adds nothing: the same as a step whose DTPE row is zero.
        zero = enc.fusion.dtpe(torch.zeros(1, dtype=torch.int64))
    assert torch.isfinite(out["fused"]).all()
    assert torch.count_nonzero(zero) == 0


def test_an_undated_step_in_a_series_is_refused_by_name(tmp_path):
    place = tmp_path / "src" / "p"
    _stack(place / "S2A_MSIL2A_20210301.tif", 700)
    _stack(place / "S2A_MSIL2A_20210801.tif", 750)
    undated = _stack(place / "S2A_MSIL2A_scene.tif", 800)
    rep = ingest(tmp_path / "src", tmp_path / "dst", IngestConfig(tile_size=24), progress=False)
    reasons = dict(rep.bad_files)
    assert list(reasons) == [str(undated)], rep.format()
    assert "no date" in reasons[str(undated)] and "series of 3" in reasons[str(undated)]
    (dates,) = Manifest(rep.manifest).query("SELECT s2_dates FROM samples")[0]
    assert dates == f"{dt.date(2021, 3, 1)},{dt.date(2021, 8, 1)}"

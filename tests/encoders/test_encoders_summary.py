"""`skysense encoders --summary model=huge`: per-part counts beside the paper's, within 2 %."""

from __future__ import annotations

import re

import pytest

from skysense.tasks.cli import main

pytestmark = pytest.mark.unit


def test_summary_of_huge_prints_counts_within_two_percent(capsys):
    assert main(["encoders", "--summary", "model=huge"]) == 0
    out = capsys.readouterr().out
    diffs = {}
    for line in out.splitlines():
        m = re.match(r"\s+(.+?)\s{2,}([\d,.]+)M\s+(\d+)M\s+([+-][\d.]+)%", line)
        if m:
            diffs[m.group(1)] = float(m.group(4))
    assert set(diffs) == {
        "HR encoder, Swin V2",
        "S2 encoder, ViT",
        "S1 encoder, ViT",
        "fusion + grid heads",
    }, out
    assert all(abs(d) < 2.0 for d in diffs.values()), diffs
    assert "fusion grid 64 x 64" in out


def test_summary_takes_overrides_and_reports_bad_ones(capsys):
    assert main(["encoders", "--summary", "model=tiny", "+model.overrides.fusion_depth=3"]) == 0
    assert "preset 'tiny'" in capsys.readouterr().out
    assert main(["encoders", "--summary", "model=tiny", "+model.overrides.grid_upscale=2"]) == 2
    assert "grids do not align" in capsys.readouterr().err

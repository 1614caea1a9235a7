"""`skysense bench`'s guard and report, on hand-made figures."""

from __future__ import annotations

import json

import pytest

from skysense.tasks import bench

pytestmark = pytest.mark.unit


def fig(name, ratio, kind="ratio", note="", **params):
    return {
        "group": "g",
        "name": name,
        "value": 1.0,
        "unit": "s",
        "baseline": 2.0,
        "baseline_name": "naive",
        "ratio": ratio,
        "kind": kind,
        "params": params,
        "note": note,
    }


def test_compare_flags_regressions_and_unexplained_slowdowns():
    figures = [
        fig("fast", 2.0),  # within tolerance of 2.2
        fig("slower", 1.0),  # fell from 2.0: regression
        fig("below_one", 0.8),  # < 1 with no note
        fig("below_one_explained", 0.8, note="by construction"),
        fig("new", 1.5),
        fig("scaling", None, kind="scaling", n=64),
    ]
    ref = {"g/fast": 2.2, "g/slower": 2.0, "g/below_one_explained": 0.8}
    v = {c["key"]: c["verdict"] for c in bench.compare(figures, ref, tolerance=0.25)}
    assert v == {
        "g/fast": "ok",
        "g/slower": "regression",
        "g/below_one": "unexplained",
        "g/below_one_explained": "ok",
        "g/new": "new",
    }


def test_figure_key_includes_params_in_order():
    assert bench.figure_key(fig("a", 1.0, n=3, d=4)) == "g/a[d=4,n=3]"


def test_markdown_and_plot(tmp_path):
    figures = [fig("x", 1.3, n=1)] + [
        fig("t", None, kind="scaling", sweep="N", N=n) | {"value": n * 0.1} for n in (64, 256, 1024)
    ]
    report = {
        "mode": "quick",
        "tolerance": 0.6,
        "machine": bench.machine(),
        "figures": figures,
        "comparison": bench.compare(figures, {}, 0.6),
    }
    md = bench.markdown(report)
    assert "| x (n=1) | 1 s | 2 s (naive) | 1.3 | new |" in md
    assert "| t | sweep=N, N=256 | 25.6 s |" in md
    png = bench.plot_scaling(figures, tmp_path / "s.png")
    assert png.exists() and png.stat().st_size > 1000
    json.dumps(report)  # serialisable as written

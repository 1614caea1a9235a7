"""`skysense bench`'s guard and report, on hand-made figures."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

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


def test_reference_guard_sets_tolerances_from_the_runs_spread():
    ref = {
        "runs": [
            {"ratios": {"g/a": 2.0, "g/b": 10.0, "g/c": 1.0}},
            {"ratios": {"g/a": 1.6, "g/b": 10.5, "g/c": 0.5}},
            {"ratios": {"g/a": 2.2, "g/b": 9.9, "g/c": 1.2, "g/new": 3.0}},
        ]
    }
    g = bench.reference_guard(ref, base=0.25)
    assert g["g/a"]["reference"] == 2.0 and g["g/a"]["departure"] == pytest.approx(0.2)
    assert g["g/a"]["tolerance"] == pytest.approx(0.3)  # 1.5 x 0.2, above the base
    assert g["g/b"]["tolerance"] == 0.25  # runs within 5 %: the base
    assert g["g/c"]["tolerance"] == bench.TOLERANCE_CAP and g["g/c"]["noisy"]  # 1.5 x 0.5 capped
    assert g["g/new"]["tolerance"] == 0.25 and g["g/new"]["runs"] == [3.0]  # one run: the base
    legacy = bench.reference_guard({"ratios": {"g/a": 2.0}}, base=0.25)
    assert legacy["g/a"]["reference"] == 2.0 and legacy["g/a"]["tolerance"] == 0.25
    figures = [fig("a", 1.45), fig("b", 7.0)]
    refs = {k: v["reference"] for k, v in g.items()}
    tols = {k: v["tolerance"] for k, v in g.items()}
    v = {c["key"]: c for c in bench.compare(figures, refs, 0.25, tols)}
    assert v["g/a"]["verdict"] == "ok"  # 1.45 >= 2.0 x (1 - 0.3)
    assert v["g/b"]["verdict"] == "regression" and "x (1 - 0.25)" in v["g/b"]["why"]
    assert bench.compare([fig("a", 1.35)], refs, 0.25, tols)[0]["verdict"] == "regression"


def test_compare_timings_add_rounds_for_short_calls():
    import time

    bl = _benchlib()
    t = bl.compare({"fast": lambda: None, "slow": lambda: time.sleep(0.002)}, repeat=2, warmup=0)
    assert len(t.rounds["fast"]) == 2  # min_time 0: the rounds asked for
    t = bl.compare(
        {"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.003)},
        repeat=2,
        warmup=0,
        min_time=0.03,
        max_repeat=40,
    )
    n = len(t.rounds["fast"])
    assert len(t.rounds["slow"]) == n and 3 <= n <= 31  # until the fast one ran 30 ms in all
    assert t["slow"] > t["fast"] and t.spread("fast", "slow") >= 0.0
    assert t.spread("fast", "slow") == bl.spread(
        [b / a for a, b in zip(t.rounds["fast"], t.rounds["slow"])]
    )


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
    assert "| x (n=1) | 1 s | 2 s (naive) | 1.3 |  |  | new |" in md
    assert "| t | sweep=N, N=256 | 25.6 s |" in md
    png = bench.plot_scaling(figures, tmp_path / "s.png")
    assert png.exists() and png.stat().st_size > 1000
    json.dumps(report)  # serialisable as written


REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _benchlib():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import benchlib

    return benchlib


def test_mem_ratio_floors_peaks_below_the_resolution():
    bl = _benchlib()
    mib = bl.MIB
    assert bl.mem_ratio(0, 0) == 1.0  # both below the floor: no information, no verdict
    assert bl.mem_ratio(16 * mib, 0) == 16.0  # not 16 MiB / 1 byte
    assert bl.mem_ratio(8 * mib, 2 * mib) == 4.0
    assert bl.mem_note(2 * mib, 3 * mib, "x").startswith("x; both peaks under 4 MiB")
    assert bl.mem_note(64 * mib, 3 * mib, "x") == "x"


def test_flop_counter_counts_cpu_flash_attention():
    import torch
    import torch.nn.functional as F

    bl = _benchlib()
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    flops, by_op = bl.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    fwd = 2 * (2 * b * h * n * n * d)  # q k^T and p v
    assert flops >= fwd + 2 * fwd, by_op  # the backward does twice the forward's matmuls
    fn, mm_flops = bl.matmul(64, reps=3)
    assert mm_flops == 2 * 64**3 * 3
    assert bl.count_flops(fn)[0] == mm_flops


FAKE_SUITE = """
import os
from pathlib import Path
from benchlib import QUICK


def spinners():
    n = 0
    for d in Path("/proc").iterdir():
        try:
            if int((d / "stat").read_text().split(") ")[1].split()[1]) == os.getpid():
                n += b"while True: pass" in (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            pass
    return n


def test_figures(report):
    r = float(os.environ["FAKE_RATIO"])
    report.add("g", "fast", 1.0, "s", baseline=r, baseline_name="naive", ratio=r,
               params={"quick": QUICK})
    report.add("g", "spinners", spinners(), "", kind="info")
    for n in (1, 2, 4):
        report.add("g", "time vs n", 0.1 * n, "s", kind="scaling", params={"sweep": "n", "n": n})
"""


def _fake_bench(tmp_path) -> Path:
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(BENCH / "conftest.py", d)
    shutil.copy(BENCH / "benchlib.py", d)
    (d / "test_fake.py").write_text(FAKE_SUITE)
    return d


@pytest.mark.slow
def test_runner_end_to_end_reference_then_regression(tmp_path, monkeypatch, capsys):
    """The whole command on a two-figure suite: a reference run, an ok run, a regression run
    (exit 1, named), then a bad threads setting (a one-line config error)."""
    from skysense.tasks.cli import compose
    from skysense.tasks.errors import ConfigError

    d = _fake_bench(tmp_path)
    out = tmp_path / "results"

    def run(ratio, *overrides):
        monkeypatch.setenv("FAKE_RATIO", str(ratio))
        cfg = compose(
            "bench", ["mode=quick", f"bench_dir={d}", f"out_dir={out}", "threads=1", *overrides]
        )
        return bench.main(cfg)

    assert run(2.0, "update_reference=true") == 0
    ref = json.loads((out / "reference-quick.json").read_text())
    assert ref["ratios"] == {"g/fast[quick=True]": 2.0}
    assert run(1.5) == 0  # within the quick tolerance (0.6) of 2.0
    report = json.loads((out / "report-quick.json").read_text())
    assert report["machine"]["torch_threads"] == 1  # the suite's threads, not this process's
    assert [c["verdict"] for c in report["comparison"]] == ["ok"]
    md = (out / "report-quick.md").read_text()
    assert "| time vs n | sweep=n, n=2 | 0.2 s |" in md and "![scaling](scaling-quick.png)" in md
    assert (out / "scaling-quick.png").stat().st_size > 1000
    capsys.readouterr()
    assert run(0.5) == 1  # 0.5 < 2.0 x (1 - 0.6): a regression
    assert "REGRESSION: g/fast[quick=True]" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="threads"):
        run(2.0, "threads=0")
    with pytest.raises(ConfigError, match="add_reference"):
        run(2.0, "update_reference=true", "add_reference=true")


@pytest.mark.slow
def test_runner_reference_sample_of_runs_and_busy(tmp_path, monkeypatch, capsys):
    """add_reference=true collects whole runs (one with busy=true: a spinning process for the
    suite, recorded in the report); the guard's tolerance comes from their spread."""
    from skysense.tasks.cli import compose

    d = _fake_bench(tmp_path)
    out = tmp_path / "results"

    def run(ratio, *overrides):
        monkeypatch.setenv("FAKE_RATIO", str(ratio))
        cfg = compose("bench", ["mode=full", f"bench_dir={d}", f"out_dir={out}", *overrides])
        return bench.main(cfg)

    def spinners():
        report = json.loads((out / "report-full.json").read_text())
        return next(f["value"] for f in report["figures"] if f["name"] == "spinners"), report

    monkeypatch.setenv("SKYSENSE_BENCH_BUSY", "1")  # inherited from a shell: busy=false wins
    assert run(2.0, "update_reference=true") == 0
    assert spinners()[0] == 0
    monkeypatch.delenv("SKYSENSE_BENCH_BUSY")
    assert run(1.6, "add_reference=true", "busy=true") == 0
    n, report = spinners()
    assert n == 1 and report["machine"]["busy"] is True and len(report["machine"]["load_avg"]) == 6
    assert run(2.2, "add_reference=true") == 0
    ref = json.loads((out / "reference-full.json").read_text())
    assert [r["busy"] for r in ref["runs"]] == [False, True, False]
    key = "g/fast[quick=False]"
    assert ref["ratios"][key] == 2.0 and ref["tolerances"][key] == pytest.approx(0.3)
    assert run(1.45) == 0  # inside the spread-set 30 %, outside the base 25 %
    md = (out / "report-full.md").read_text()
    assert "## Guard" in md and "| 1.45 |  | 2 (0.3) | ok |" in md
    assert md.count("| other core busy |") == 1 and md.count("| quiet |") == 2  # the 3 runs
    assert f"| {key} | 2, 1.6, 2.2 | 0.20 | 0.30 |" in md
    capsys.readouterr()
    assert run(1.35) == 1
    assert f"REGRESSION: {key}: ratio 1.35 < reference 2 x (1 - 0.3)" in capsys.readouterr().out
    # A reference in the old format (one run's ratios, no runs) is kept as that run when added to.
    legacy = {"mode": "full", "machine": {"commit": "old"}, "ratios": {key: 3.0}}
    (out / "reference-full.json").write_text(json.dumps(legacy))
    assert run(2.0, "add_reference=true") == 0
    ref = json.loads((out / "reference-full.json").read_text())
    assert [r["commit"] for r in ref["runs"]][0] == "old"
    assert [r["ratios"][key] for r in ref["runs"]] == [3.0, 2.0]


@pytest.mark.slow
def test_gpu_pretrain_check_dry_run(tmp_path):
    """bench/gpu/check_pretrain.py's CPU path: the tiny preset through MetaArch.step with
    activation checkpointing, model FLOPs with the recompute left out, the table; with Hydra and
    OmegaConf hidden, as on the GPU image (fp32: the CPU's bf16 is slow). In its own process: the
    script puts a stand-in omegaconf module in sys.modules."""
    import os
    import subprocess

    out = tmp_path / "gpu-pretrain.txt"
    args = ["--dry-run", "--precision", "fp32", "--without-omegaconf", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, str(BENCH / "gpu" / "check_pretrain.py"), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd="/",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert "config yaml" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[6:8] == ["on", "ok"], row
    model, recomputed, mfu = float(cells[10]), float(cells[11]), float(cells[13])
    assert model > 0 and 0 < recomputed < model and 0 < mfu < 1, row


def test_peer_infer_run_finds_this_checkouts_sources(monkeypatch):
    """The TerraTorch peer's environment has no skysense: infer_run.py puts the sources of the
    checkout it belongs to first on sys.path (a path baked into a shared environment named a
    clone since deleted: "No module named 'skysense'")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_run", BENCH / "peers" / "infer_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "path", ["/elsewhere"])
    mod._checkout_sources()
    srcs = [Path(p) for p in sys.path[:-1]]
    assert sys.path[-1] == "/elsewhere" and len(srcs) == 5
    found = {p.name for s in srcs for p in (s / "skysense").iterdir() if p.is_dir()}
    assert {"kernels", "encoders", "losses", "data", "tasks"} <= found

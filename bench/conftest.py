"""The benchmark suite's shared fixture: ``report`` collects every figure of the run.

A figure is ``report.add(group, name, value, unit, baseline=..., ratio=..., note=...)``: ``ratio``
is ours over the baseline oriented so that > 1 means ours is better (a speed-up, a memory saving),
measured in the same run; ``spread`` is how far its interleaved rounds disagreed, where the
figure has rounds (:meth:`benchlib.Timings.spread`). ``kind`` says what a figure is: "ratio" figures are guarded against the
committed reference; "scaling" and "info" figures are reported and plotted only.
At the end of the session the figures go to $SKYSENSE_BENCH_OUT (default
bench/results/raw-<mode>.json), which `skysense bench` turns into the JSON and Markdown report.
$SKYSENSE_BENCH_THREADS (set by `skysense bench threads=N`) fixes torch's CPU threads for the
whole session; the raw file records the threads the figures were measured with.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from benchlib import MODE


@dataclass
class Figure:
    group: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    kind: str = "ratio"
    params: dict = field(default_factory=dict)
    note: str = ""
    spread: float | None = None  # (max - min) / median of the per-round ratios, where known


def pytest_configure(config):
    threads = os.environ.get("SKYSENSE_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


class Report:
    def __init__(self):
        self.figures: list[Figure] = []

    def add(
        self,
        group,
        name,
        value,
        unit,
        *,
        baseline=None,
        baseline_name=None,
        ratio=None,
        kind=None,
        params=None,
        note="",
        spread=None,
    ):
        if kind is None:
            kind = "ratio" if ratio is not None else "info"
        fig = Figure(
            group,
            name,
            float(value),
            unit,
            None if baseline is None else float(baseline),
            baseline_name,
            None if ratio is None else float(ratio),
            kind,
            params or {},
            note,
            None if spread is None else float(spread),
        )
        self.figures.append(fig)
        return fig


@pytest.fixture(scope="session")
def report():
    r = Report()
    yield r
    out = Path(
        os.environ.get("SKYSENSE_BENCH_OUT", Path(__file__).parent / "results" / f"raw-{MODE}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    import torch

    raw = {
        "mode": MODE,
        "torch_threads": torch.get_num_threads(),
        "figures": [asdict(f) for f in r.figures],
    }
    tmp.write_text(json.dumps(raw, indent=1))
    tmp.replace(out)


@pytest.fixture(scope="session")
def bench_mode():
    return MODE


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded sample's manifest (skysense.data.ensure_embedded), made once per session:
    6 places in quick mode, 48 (the pre-training default) in full mode. $SKYSENSE_BENCH_DATA
    keeps it between runs."""
    from skysense.data.embedded import ensure_embedded

    root = os.environ.get("SKYSENSE_BENCH_DATA") or tmp_path_factory.mktemp("embedded")
    return ensure_embedded(Path(root), n_samples=6 if MODE == "quick" else 48)

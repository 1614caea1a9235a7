"""Primary configs that are dataclasses, not YAML files: ``skysense ingest``, ``skysense
infer`` and ``skysense bench``. Their fields, types and defaults are written once, here or in the runtime config they
extend (:class:`skysense.data.ingest.IngestConfig`); ``skysense <command> --help`` prints the
docstrings below as the meaning of each key. Imported by :func:`schema.register` only (it reads
the data package, which the Hydra-less GPU check script does not install).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from skysense.data.ingest import IngestConfig
from skysense.tasks.conf.schema import InferConfig


@dataclass
class IngestCommandConfig(IngestConfig):
    """``skysense ingest SRC DST``: GeoTIFFs (any CRS, per-band files or stacks) -> shards +
    SQLite manifest. Every field of :class:`skysense.data.ingest.IngestConfig` (above), and:

    src: the source folder, file, STAC catalogue / ItemCollection JSON or STAC GeoParquet.
    dst: the ingest folder (manifest.sqlite, shards/, plots/).
    plots: preview PNGs of the first samples written to DST/plots (0: none).
    """

    src: str = MISSING
    dst: str = MISSING
    plots: int = 2


@dataclass
class BenchConfig:
    """``skysense bench``: the benchmark suite in bench/ (pytest-benchmark), one report, one
    guard.

    mode: full (every figure at the sizes of the issues' acceptance points) or quick (small
      sizes, ratios only, for CI: under 2 minutes).
    tolerance: a guarded ratio that falls below reference * (1 - tolerance) is a regression
      (exit 1); null: 0.25 in full mode, 0.6 (generous) in quick mode.
    bench_dir: the suite's folder (null: ./bench, else found upward from the working directory).
    out_dir: where the report goes (null: <bench_dir>/results).
    reference: reference ratios to compare with (null: <out_dir>/reference-<mode>.json).
    update_reference: write this run's ratios as the new reference instead of comparing.
    threads: torch's CPU threads for the whole suite (also OMP_NUM_THREADS of its processes);
      null: torch's default (one per core). 1 by default: on a shared machine an OpenMP region
      of 2+ threads stalls whenever another process holds a core (the same pre-training step
      measured 0.4 to 19 s with 2 threads on 2 busy cores, 0.36-0.42 s with 1), which no
      interleaving of ours and the baseline undoes. Every figure and its baseline run at the
      same threads.
    pytest_args: extra pytest arguments, e.g. "-k attention".
    """

    mode: str = "full"
    tolerance: float | None = None
    bench_dir: str | None = None
    out_dir: str | None = None
    reference: str | None = None
    update_reference: bool = False
    threads: int | None = 1
    pytest_args: str = ""


PRIMARY: dict[str, type] = {
    "ingest": IngestCommandConfig,
    "infer": InferConfig,
    "bench": BenchConfig,
}

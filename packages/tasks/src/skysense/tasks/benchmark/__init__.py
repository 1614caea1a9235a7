"""`skysense benchmark suite=NAME`: suites of dataset x task x protocol entries, run for every
model (pre-training checkpoints side by side, the encoder at random init, baselines) and seed,
reported with mean, IQM and bootstrap 95 % intervals (see :mod:`.runner`, :mod:`.protocols`,
:mod:`.stats`, :mod:`.report`; the suites are ``conf/suite/*.yaml``)."""

from __future__ import annotations


def main(cfg, command: str = "benchmark") -> int:
    from skysense.tasks.benchmark.runner import run_benchmark

    res = run_benchmark(cfg)
    print(res["table"])
    print(f"report: {res['files']['md']}, {res['files']['json']}, {res['files']['png']}")
    return 0

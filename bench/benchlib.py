"""Measuring helpers for the benchmark suite.

Every figure is reported beside a baseline measured in the same run, as a ratio, because these
machines are noisy: :func:`compare` times ours and the baseline interleaved (A B A B ...) and
takes medians. Peak memory is the rise of the process's resident high-water mark
(``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``) during one call.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

MODE = os.environ.get("SKYSENSE_BENCH_MODE", "full")  # "full" or "quick"
QUICK = MODE == "quick"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compare(
    fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall times (s) of several callables, measured interleaved round by round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set's peak rose above its level before ``fn()`` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    peak = _status("VmHWM")
    return max(0, peak - before)


def peak_cuda(fn: Callable[[], object]) -> int:
    """Bytes of CUDA memory allocated at the peak of ``fn()`` beyond what was held before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before

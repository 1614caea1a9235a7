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
from pathlib import Path

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


class Timings(dict):
    """:func:`compare`'s medians (name -> seconds), with every round's times in ``rounds``."""

    rounds: dict[str, list[float]]

    def spread(self, ours: str, baseline: str) -> float:
        """:func:`spread` of the per-round ratios ``baseline / ours`` (> 1: ours faster)."""
        return spread([b / o for o, b in zip(self.rounds[ours], self.rounds[baseline])])


def compare(
    fns: dict[str, Callable[[], object]],
    repeat: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    max_repeat: int = 60,
) -> Timings:
    """Median wall times (s) of several callables, measured interleaved round by round.

    ``min_time``: where the first ``repeat`` rounds left the fastest callable under ``min_time``
    seconds in all, more rounds run (up to ``max_repeat``): a 5 ms epoch timed 3 times is at the
    mercy of one scheduler tick (measured: a 6-patch loader ratio read 18.7 one run, 10.3 the next).
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    ts: dict[str, list[float]] = {k: [] for k in fns}

    def one_round():
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            ts[k].append(time.perf_counter() - t0)

    for _ in range(repeat):
        one_round()
    while len(next(iter(ts.values()))) < max_repeat and min(sum(v) for v in ts.values()) < min_time:
        one_round()
    out = Timings({k: statistics.median(v) for k, v in ts.items()})
    out.rounds = ts
    return out


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


def compare_peak(fns: dict[str, Callable[[], object]], rounds: int = 1) -> dict[str, int]:
    """Median :func:`peak_rss` of several callables over interleaved rounds (A B A B ...).

    At small sizes the first measured call can carry the allocator's one-off growth (measured
    here: a loss's fused path 10.5 MiB on its first call, 4.3 MiB on every later one), which
    one round charges to whichever runs first; more rounds take it out."""
    peaks: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            peaks[k].append(peak_rss(f))
    return {k: int(statistics.median(v)) for k, v in peaks.items()}


def peak_cuda(fn: Callable[[], object]) -> int:
    """Bytes of CUDA memory allocated at the peak of ``fn()`` beyond what was held before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


MIB = 1 << 20
# The resolution of ``peak_rss`` here: page-granular, and the allocator keeps blocks under its
# mmap threshold (1 MiB, set by the memory benchmarks) in the heap.
MEM_FLOOR = MIB


def mem_ratio(baseline: int, ours: int, floor: int = MEM_FLOOR) -> float:
    """``baseline / ours`` peak bytes (> 1: ours smaller), each counted as at least ``floor``.

    Below the floor a peak is noise (0 bytes measured one run, a few pages the next), and a
    ratio of two such numbers swings by orders of magnitude; with the floor, two peaks both under
    it give 1.0 and a tiny ours against a real baseline gives baseline / floor.
    """
    return max(baseline, floor) / max(ours, floor)


def mem_note(baseline: int, ours: int, note: str = "", floor: int = MEM_FLOOR) -> str:
    """``note``, plus a word on resolution where both peaks are within 4x of ``floor``: there a
    ratio says little (quick-mode sizes), and one below 1 is that noise."""
    if max(baseline, ours) >= 4 * floor:
        return note
    res = (
        f"both peaks under {4 * floor / MIB:.0f} MiB, near the {floor / MIB:.0f} MiB resolution "
        "of the resident-peak measurement (small sizes): the ratio is noise there"
    )
    return f"{note}; {res}" if note else res


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention
    ops (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, absent from
    torch's table) with the formulas torch uses for the CUDA ones: the matmuls of every
    ``scaled_dot_product_attention`` count on either device. Only matmul-like ops (mm, addmm,
    bmm, convolution, attention) count, as in every MFU figure; elementwise work counts none."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            custom[op] = fn
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn()`` (see :func:`flop_counter`): total and per aten op."""
    with flop_counter() as fc:
        fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), by_op


# Backends under which the counter sees the model's math once: torch SDPA for attention (counted
# by formula on either device, where a Triton kernel is invisible to the counter), the
# materialising references for the fused losses (whose block-wise backends recompute the logits
# in the backward: hardware FLOPs, not model FLOPs).
MODEL_FLOP_BACKENDS = {
    "attention": "sdpa",
    "info_nce": "reference",
    "prototype_cross_entropy": "reference",
}


def count_model_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """:func:`count_flops` of ``fn()`` with skysense.kernels forced to
    :data:`MODEL_FLOP_BACKENDS`: the model FLOPs of MFU, whichever kernels the timed calls use."""
    import contextlib

    from skysense.kernels import force_backend

    with contextlib.ExitStack() as stack:
        for op, backend in MODEL_FLOP_BACKENDS.items():
            stack.enter_context(force_backend(op, backend))
        return count_flops(fn)


def matmul(n: int, dtype=None, device: str = "cpu", reps: int = 1):
    """``(fn, flops)``: ``fn()`` runs ``reps`` square ``n x n`` products (``torch.mm`` into a
    preallocated output) of ``dtype`` (default float32) on ``device``; ``flops`` = 2 n^3 reps.
    Timed beside a model, it gives the matmul FLOP/s this machine reaches in the same run, the
    denominator of MFU."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype or torch.float32)
    c = torch.empty_like(a)

    def fn():
        for _ in range(reps):
            torch.mm(a, b, out=c)

    return fn, 2 * n**3 * reps


# -- Peers: other projects measured in the same run (bench/peers, bench/test_bench_peers.py) --
# They run in environments of their own (bench/peers/setup.sh: their pins clash with the
# project's), each in a fresh process per measurement, so the bench finds their interpreters.
PEER_ABSENT = "peer absent"  # the ``kind`` of a peer figure that could not be measured
PEER_VENVS = {"torchgeo": "", "terratorch": "-terratorch"}  # suffix of $SKYSENSE_PEERS_VENV


def peer_python(peer: str) -> tuple[str | None, str]:
    """``(interpreter, "")`` of ``peer``'s environment, or ``(None, why it is absent)``.

    The environments are ``.venv-peers`` (TorchGeo) and ``.venv-peers-terratorch`` at the
    repository root (``$SKYSENSE_PEERS_VENV`` moves the prefix); ``make bench`` builds them, and
    a failed build leaves its reason in ``<env>/.peers-absent``."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prefix = os.environ.get("SKYSENSE_PEERS_VENV") or str(root / ".venv-peers")
    venv = Path(prefix + PEER_VENVS[peer])
    if (venv / ".peers-absent").exists():
        return None, (venv / ".peers-absent").read_text().strip()
    if not (venv / ".peers-installed").exists():
        return None, f"{venv} is not set up (`make bench` runs bench/peers/setup.sh)"
    return str(venv / "bin" / "python"), ""


def report_absent(report, group: str, name: str, reason: str, params=None):
    """A peer figure that could not be measured: reported (kind "peer absent", value NaN, the
    reason in its note), never skipped silently, and outside the guard."""
    return report.add(
        group,
        name,
        float("nan"),
        "",
        kind=PEER_ABSENT,
        params=params,
        note=f"{PEER_ABSENT}: {reason}",
    )


def spread(values) -> float:
    """``(max - min) / median`` of a figure's per-round values: how far rounds disagree."""
    vals = sorted(values)
    return (vals[-1] - vals[0]) / statistics.median(vals) if vals else 0.0


def busy_core():
    """A context manager: one spinning process (a pure-Python loop, one core) while it is open,
    the "other core busy" condition of the guard under load. ``SKYSENSE_BENCH_BUSY=1`` keeps one
    spinning for the whole session (started when the suite imports this module)."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def cm():
        p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            yield p
        finally:
            p.kill()
            p.wait()

    return cm()


if (
    os.environ.get("SKYSENSE_BENCH_BUSY") == "1"
    and os.environ.get("_SKYSENSE_BENCH_SPINNING") != "1"
):
    import atexit

    os.environ["_SKYSENSE_BENCH_SPINNING"] = "1"  # processes the suite starts do not spin again
    _BUSY = busy_core()
    _BUSY.__enter__()
    atexit.register(_BUSY.__exit__, None, None, None)


def tiny_segmentation_file(path, window: int, overlap: int, n_classes: int = 4) -> Path:
    """The tiny preset with a UperNet segmentation head on HR RGB (random weights, seed 0),
    written as a fine-tuned model file at ``path``: what the inference figures run."""
    import torch

    from skysense.encoders import build_skysense
    from skysense.tasks.downstream.checkpoint import save_finetuned
    from skysense.tasks.downstream.data import _sensor_inputs
    from skysense.tasks.downstream.model import build_task_model

    torch.manual_seed(0)
    example = {"hr": torch.randn(1, 3, window, window)}
    model = build_task_model(
        build_skysense("tiny"), "segmentation", "hr", n_classes, example, head_channels=32
    )
    meta = {
        "preset": "tiny",
        "overrides": {},
        "kind": "segmentation",
        "source": "hr",
        "n_classes": n_classes,
        "channels": model.channels,
        "head": {"head_channels": 32},
        "classes": list("abcdefghij"[:n_classes]),
        "inputs": _sensor_inputs({"hr": "hr_rgb"}, "hr"),
        "eval": {"window": window, "overlap": overlap},
    }
    return save_finetuned(path, model, meta)

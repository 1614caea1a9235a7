"""`skysense bench`: run the benchmark suite, write one report, guard the ratios.

The suite (``bench/test_bench_*.py``, pytest-benchmark) records every figure beside a baseline
measured in the same run (bench/conftest.py ``report``). This command runs it, then writes

- ``<out>/report-<mode>.json``: the machine, every figure, the comparison;
- ``<out>/report-<mode>.md``: the same as tables a person reads;
- ``<out>/scaling-<mode>.png``: how cost grows with the work (the "scaling" figures);

and compares each guarded ratio with the committed reference: a ratio below
``reference * (1 - tolerance)`` is a regression, and so is a ratio below 1.0 (ours slower or
bigger than the baseline) that carries no explanation; either makes the command exit 1.
``threads`` fixes torch's CPU threads of the whole suite (1 by default: see
:class:`skysense.tasks.conf.commands.BenchConfig`).

The reference is a sample of whole runs (``add_reference=true`` adds this one; quiet runs and
runs with the other core busy, ``busy=true``): each figure's reference is the median of its
runs, and its tolerance is set from how far they spread (:func:`reference_guard`), never below
the base tolerance (the mode's, or ``tolerance=``) and, from the spread, never above
:data:`TOLERANCE_CAP`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"full": 0.25, "quick": 0.6}
# A figure's tolerance from its reference runs: SPREAD_MARGIN x the largest departure of a run from
# their median, within [base tolerance, TOLERANCE_CAP]; a figure that needs more than the cap is
# reported "noisy" (more interleaved rounds, not a looser guard, is its remedy).
SPREAD_MARGIN = 1.5
TOLERANCE_CAP = 0.6
REFERENCE_KEEP = 8  # the newest runs a reference keeps
GUARD_RULE = (
    f"reference = median of the reference runs; tolerance = max(base, min({TOLERANCE_CAP}, "
    f"{SPREAD_MARGIN} x the largest |run - median| / median)); regression: ratio < reference x "
    "(1 - tolerance)"
)


def find_bench_dir(start: Path | None = None) -> Path:
    """The suite's folder: ``bench/`` holding ``conftest.py``, looked up from ``start`` upward."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "bench" / "conftest.py").exists():
            return d / "bench"
    raise ConfigError("bench_dir", f"no bench/conftest.py in {here} or above; set bench_dir=PATH")


def machine(torch_threads: int | None = None) -> dict:
    """CPU, cores, memory, accelerator and versions: what a figure was measured on
    (``torch_threads``: the suite's, where known; else this process's)."""
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("triton", "rasterio", "timm"):
        # A missing optional package is just absent from the list.
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch_threads or torch.get_num_threads(),
        "memory_gib": mem,
        "device": dev,
        "platform": platform.platform(),
        "versions": versions,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def figure_key(f: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(f.get("params", {}).items()))
    return f"{f['group']}/{f['name']}" + (f"[{params}]" if params else "")


def reference_guard(ref: dict, base: float) -> dict[str, dict]:
    """Each guarded key's reference ratio and tolerance, from a reference file's contents.

    ``ref["runs"]`` (a list of ``{"ratios": {key: ratio}, ...}``, one per whole run): the
    reference is the median of the key's runs, ``departure`` the largest ``|run - median| /
    median``, and the tolerance ``max(base, min(TOLERANCE_CAP, SPREAD_MARGIN * departure))``
    (``noisy`` where the cap cut it). A key in one run only, or a file without runs (one run's
    ``ratios``), gets ``base``.
    """
    runs = ref.get("runs") or [{"ratios": ref.get("ratios", {})}]
    by_key: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for k, r in run["ratios"].items():
            by_key[k].append(float(r))
    out = {}
    for k, rs in by_key.items():
        med = statistics.median(rs)
        dep = max(abs(r - med) for r in rs) / med if med else 0.0
        want = SPREAD_MARGIN * dep if len(rs) > 1 else 0.0
        out[k] = {
            "reference": med,
            "tolerance": max(base, min(TOLERANCE_CAP, want)),
            "runs": rs,
            "departure": dep,
            "noisy": want > TOLERANCE_CAP,
        }
    return out


def compare(
    figures: list[dict],
    reference: dict[str, float],
    tolerance: float,
    tolerances: dict[str, float] | None = None,
) -> list[dict]:
    """Verdicts for the guarded ("ratio") figures: ok, regression, unexplained, new.
    ``tolerances``: per-key tolerances (:func:`reference_guard`) where they differ from
    ``tolerance``."""
    out = []
    for f in figures:
        if f.get("kind") != "ratio" or f.get("ratio") is None:
            continue
        key = figure_key(f)
        ref = reference.get(key)
        tol = (tolerances or {}).get(key, tolerance)
        verdict, why = "ok", ""
        if ref is not None and f["ratio"] < ref * (1.0 - tol):
            verdict = "regression"
            why = f"ratio {f['ratio']:.3g} < reference {ref:.3g} x (1 - {tol:.3g})"
        elif f["ratio"] < 1.0 and not f.get("note"):
            verdict = "unexplained"
            why = f"ratio {f['ratio']:.3g} < 1.0 with no explanation"
        elif ref is None:
            verdict = "new"
        out.append(
            {
                "key": key,
                "ratio": f["ratio"],
                "reference": ref,
                "tolerance": tol,
                "verdict": verdict,
                "why": why,
            }
        )
    return out


def _fmt(v, unit=""):
    if v is None:
        return ""
    if isinstance(v, float):
        a = abs(v)
        s = f"{v:.3g}" if (a >= 1e-3 and a < 1e5) or a == 0 else f"{v:.3e}"
    else:
        s = str(v)
    return f"{s} {unit}".strip()


def gpu_compile_summary(out_dir: Path) -> str:
    """The summary of the ahead-of-time compiled Triton kernels (registers, spills, shared
    memory, occupancy on sm_80 and sm_90; ``gpu_compile`` test tier, ``python -m
    skysense.kernels.aot_report``) for the report, with a link to the full table; "" without
    one."""
    table = Path(out_dir) / "gpu-compile.md"
    if not table.is_file():
        return ""
    lines = table.read_text().splitlines()
    how = [ln for ln in lines[:12] if ln.startswith("`python -m")]
    head = how + [""] + [ln for ln in lines[:12] if ln.startswith("- ")]
    return (
        "\n## Triton kernels compiled ahead of time (sm_80, sm_90)\n\n"
        + "\n".join(head)
        + f"\n\nPer kernel and launch configuration: [{table.name}]({table.name}).\n"
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# SkySense benchmark report ({report['mode']} mode)",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB, device {m['device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- commit {m['commit']}, {m['date']}; base tolerance {report['tolerance']}; "
        + ("the other core busy (a spinning process, busy=true)" if m.get("busy") else "quiet")
        + (
            f"; 1-min load average {m['load_avg'][0]:.2f} at the start, {m['load_avg'][3]:.2f} "
            "at the end"
            if m.get("load_avg")
            else ""
        ),
        "",
        "Every ratio is ours over a baseline measured in the same run, oriented so that > 1 means"
        " ours is better (faster, or less memory).",
        "",
    ]
    verdicts = {v["key"]: v for v in report["comparison"]}
    groups: dict[str, list[dict]] = defaultdict(list)
    for f in report["figures"]:
        groups[f["group"]].append(f)
    for g, figs in groups.items():
        lines += [f"## {g}", ""]
        ratio_figs = [f for f in figs if f["kind"] != "scaling"]
        if ratio_figs:
            lines += [
                "| figure | ours | baseline | ratio | spread | reference (tolerance) | verdict "
                "| note |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for f in ratio_figs:
                v = verdicts.get(figure_key(f), {})
                name = f["name"] + (
                    " (" + ", ".join(f"{k}={x}" for k, x in f["params"].items()) + ")"
                    if f["params"]
                    else ""
                )
                base = _fmt(f["baseline"], f["unit"]) + (
                    f" ({f['baseline_name']})" if f.get("baseline_name") else ""
                )
                ref = (
                    f"{_fmt(v['reference'])} ({v['tolerance']:.2g})"
                    if v.get("reference") is not None
                    else ""
                )
                lines.append(
                    f"| {name} | {_fmt(f['value'], f['unit'])} | {base} | {_fmt(f['ratio'])} | "
                    f"{_fmt(f.get('spread'))} | {ref} | {v.get('verdict', f['kind'])} | "
                    f"{f.get('note', '')} |"
                )
            lines.append("")
        scaling = [f for f in figs if f["kind"] == "scaling"]
        if scaling:
            lines += ["| scaling | parameters | value |", "|---|---|---|"]
            for f in scaling:
                p = ", ".join(f"{k}={x}" for k, x in f["params"].items())
                lines.append(f"| {f['name']} | {p} | {_fmt(f['value'], f['unit'])} |")
            lines.append("")
    lines += guard_section(report)
    bad = [v for v in report["comparison"] if v["verdict"] in ("regression", "unexplained")]
    lines += ["## Verdict", ""]
    if bad:
        lines += [f"- **{v['verdict']}**: {v['key']}: {v['why']}" for v in bad]
    else:
        lines.append("No regression: every guarded ratio is within tolerance of the reference.")
    return "\n".join(lines) + "\n"


def guard_section(report: dict) -> list[str]:
    """The guard's rule, its reference runs and the figures whose tolerance their spread set."""
    guard = report.get("guard")
    if not guard:
        return []
    lines = [
        "## Guard",
        "",
        f"Rule: {GUARD_RULE}. Spread column: (max - min) / median of the "
        "figure's per-round ratios in this run, where it has rounds.",
        "",
    ]
    runs = guard.get("runs", [])
    if runs:
        lines += [
            f"Reference runs ({len(runs)}):",
            "",
            "| date | commit | load | 1-min load average, start / end |",
            "|---|---|---|---|",
        ]
        for r in runs:
            la = r.get("load_avg")
            lines.append(
                f"| {r.get('date', '')} | {r.get('commit', '')} | "
                f"{'other core busy' if r.get('busy') else 'quiet'} | "
                f"{'' if not la else f'{la[0]:.2f} / {la[3]:.2f}'} |"
            )
        lines.append("")
    wide = [(k, g) for k, g in guard["figures"].items() if g["tolerance"] > report["tolerance"]]
    if wide:
        lines += [
            "Figures whose reference runs spread past the base tolerance (tolerance from their "
            "spread):",
            "",
            "| figure | runs | departure | tolerance |",
            "|---|---|---|---|",
        ]
        for k, g in sorted(wide, key=lambda x: -x[1]["departure"]):
            rs = ", ".join(f"{r:.3g}" for r in g["runs"])
            flag = " (noisy: capped; needs more rounds)" if g["noisy"] else ""
            lines.append(f"| {k} | {rs} | {g['departure']:.2f} | {g['tolerance']:.2f}{flag} |")
        lines.append("")
    return lines


def plot_scaling(figures: list[dict], path: Path) -> Path | None:
    """One panel per scaling series: value against its swept parameter."""
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for f in figures:
        if f["kind"] != "scaling" or not f["params"]:
            continue
        sweep = f["params"].get("sweep") or next(iter(f["params"]))
        x = f["params"].get(sweep)
        if not isinstance(x, (int, float)):
            continue
        series[(f["group"], f["name"], sweep)].append((x, f["value"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
    units = {(f["group"], f["name"]): f["unit"] for f in figures}
    for ax, ((g, name, sweep), pts) in zip(axes.flat, sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_title(f"{g}: {name}", fontsize=9)
        ax.set_xlabel(sweep)
        ax.set_ylabel(units.get((g, name), ""))
        if max(p[0] for p in pts) / max(min(p[0] for p in pts), 1e-9) > 20:
            ax.set_xscale("log", base=2)
        ys = [p[1] for p in pts]
        if min(ys) > 0 and max(ys) / min(ys) > 20:  # e.g. attention's N^2: log-log shows it
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(cfg: DictConfig, command: str = "bench") -> int:
    mode = cfg.mode
    if mode not in ("full", "quick"):
        raise ConfigError("mode", f"'{mode}' is not one of full, quick")
    bench_dir = Path(cfg.bench_dir) if cfg.bench_dir else find_bench_dir()
    if not (bench_dir / "conftest.py").exists():
        raise ConfigError("bench_dir", f"{bench_dir} has no conftest.py")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else bench_dir / "results"
    tolerance = cfg.tolerance if cfg.tolerance is not None else DEFAULT_TOLERANCE[mode]
    ref_path = Path(cfg.reference) if cfg.reference else out_dir / f"reference-{mode}.json"
    raw = out_dir / f"raw-{mode}.json"
    raw.unlink(missing_ok=True)

    env = dict(os.environ, SKYSENSE_BENCH_MODE=mode, SKYSENSE_BENCH_OUT=str(raw))
    threads = cfg.get("threads")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError("threads", f"must be a positive integer or null, got {threads!r}")
        env.update(SKYSENSE_BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if cfg.busy:
        env["SKYSENSE_BENCH_BUSY"] = "1"  # benchlib starts one spinning process for the session
    else:  # not one inherited from the caller's shell: the report would say "quiet"
        env.pop("SKYSENSE_BENCH_BUSY", None)
        env.pop("_SKYSENSE_BENCH_SPINNING", None)
    if cfg.update_reference and cfg.add_reference:
        raise ConfigError("add_reference", "update_reference=true and add_reference=true: say one")
    load_start = os.getloadavg()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-disable-gc",
        *shlex.split(cfg.pytest_args),
    ]
    log.info("running %s", " ".join(cmd))
    rc = subprocess.call(cmd, env=env)
    if not raw.exists():
        print(
            f"skysense bench: the suite wrote no figures ({raw}); pytest exit {rc}", file=sys.stderr
        )
        return 1
    raw_data = json.loads(raw.read_text())
    figures = raw_data["figures"]
    ref_file = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    if not ref_file and not (cfg.update_reference or cfg.add_reference):
        log.warning(
            "no reference at %s: every ratio is new (run with update_reference=true)", ref_path
        )
    guard = reference_guard(ref_file, tolerance)
    comparison = compare(
        figures,
        {k: g["reference"] for k, g in guard.items()},
        tolerance,
        {k: g["tolerance"] for k, g in guard.items()},
    )
    mach = machine(raw_data.get("torch_threads"))
    mach.update(busy=bool(cfg.busy), load_avg=[*load_start, *os.getloadavg()])
    report = {
        "mode": mode,
        "tolerance": tolerance,
        "machine": mach,
        "figures": figures,
        "comparison": comparison,
        "guard": {"runs": [_run_summary(r) for r in ref_file.get("runs", [])], "figures": guard},
        "pytest_exit": rc,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"report-{mode}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report) + gpu_compile_summary(out_dir)
    png = plot_scaling(figures, out_dir / f"scaling-{mode}.png")
    if png:
        md += f"\n![scaling]({png.name})\n"
    (out_dir / f"report-{mode}.md").write_text(md)
    bad = [v for v in comparison if v["verdict"] in ("regression", "unexplained")]
    if (cfg.update_reference or cfg.add_reference) and rc != 0:
        log.warning("the reference %s is left as it was: the suite failed (pytest exit %d)",
                    ref_path, rc)  # fmt: skip
    elif cfg.update_reference or cfg.add_reference:
        run = {
            **_run_summary(mach),
            "ratios": {
                figure_key(f): f["ratio"]
                for f in figures
                if f["kind"] == "ratio" and f["ratio"] is not None
            },
        }
        earlier = ref_file.get("runs") or (
            # a reference of one run in the old format (no "runs") is that run
            [{**_run_summary(ref_file.get("machine", {})), "ratios": ref_file["ratios"]}]
            if ref_file.get("ratios")
            else []
        )
        runs = [*earlier, run] if cfg.add_reference else [run]
        runs = runs[-REFERENCE_KEEP:]
        new = reference_guard({"runs": runs}, tolerance)
        ref_path.write_text(
            json.dumps(
                {
                    "mode": mode,
                    "rule": GUARD_RULE,
                    "note": "ratios and tolerances are for reading: the guard recomputes both "
                    "from runs, with the base tolerance of the run that reads them",
                    "ratios": {k: g["reference"] for k, g in new.items()},
                    "tolerances": {k: g["tolerance"] for k, g in new.items()},
                    "runs": runs,
                },
                indent=1,
            )
        )
        log.info("wrote the reference %s (%d runs, %d ratios)", ref_path, len(runs), len(new))
        if bad and cfg.add_reference:
            log.warning(
                "added to the reference although %d ratio(s) failed the guard before (listed "
                "below): they widen those figures' tolerances; update_reference=true starts over",
                len(bad),
            )
    print(f"skysense bench: {len(figures)} figures, report {out_dir / f'report-{mode}.md'}")
    for v in bad:
        print(f"  {v['verdict'].upper()}: {v['key']}: {v['why']}")
    if rc != 0:
        print(f"skysense bench: pytest exited {rc}", file=sys.stderr)
        return 1
    return 1 if (bad and not (cfg.update_reference or cfg.add_reference)) else 0


def _run_summary(m: dict) -> dict:
    """What a reference keeps of a run's machine record: when, which commit, how loaded."""
    return {k: m.get(k) for k in ("date", "commit", "cpu", "torch_threads", "busy", "load_avg")}

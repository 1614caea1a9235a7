"""The benchmark report: ``report.json`` (every run, the per-entry statistics and the
normalised scores), ``report.md`` (the table) and ``report.png`` (per entry, each model's mean
with its bootstrap 95 % interval and the single seeds as dots).

Columns of the table: the entry's headline metric over seeds as mean, IQM and bootstrap 95 %
interval (:mod:`stats`); ``norm.``: ``(mean - random-init mean) / (1 - random-init mean)`` on
the same entry; ``plateaued``: runs whose optimisation had flattened (probes: L-BFGS reached
its gradient tolerance; k-NN: no optimisation; fine-tuning with early stopping: no validation
improvement for ``patience`` evaluations by the end; without: the mean loss of the last 20 % of
steps within 5 % of the 20 % before) out of the runs; ``stop``: how the trained runs ended (:func:`stop_cell`); ``s/run``:
mean wall time of a run.
"""

from __future__ import annotations

import math
from pathlib import Path

from skysense.tasks.benchmark import stats

RANDOM = "random init"


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def summarise(results: dict, n_boot: int = 10000) -> dict:
    """Adds ``summary`` to every model of every entry and ``normalised`` per model."""
    per_model: dict[str, dict[str, list[float]]] = {}
    refs: dict[str, float] = {}
    for rec in results["entries"]:
        for model, m in rec.get("models", {}).items():
            runs = m["runs"]
            scores = [r["score"] for r in runs]
            s = stats.summarise(scores, n_boot)
            s["metric"] = next((r["metric"] for r in runs if "metric" in r), None)
            plat = [r.get("plateaued") for r in runs if r.get("plateaued") is not None]
            s["plateaued"] = f"{sum(bool(p) for p in plat)}/{len(plat)}" if plat else "n/a"
            s["stop"] = stop_cell(runs)
            s["seconds"] = stats.mean([r.get("seconds", math.nan) for r in runs])
            s["errors"] = sorted({r["error"] for r in runs if r.get("error")})
            m["summary"] = s
            if s["n"]:
                per_model.setdefault(model, {})[rec["id"]] = s["values"]
        if RANDOM in rec.get("models", {}) and rec["models"][RANDOM]["summary"]["n"]:
            refs[rec["id"]] = rec["models"][RANDOM]["summary"]["mean"]
        for m in rec.get("models", {}).values():
            ref = refs.get(rec["id"], math.nan)
            m["summary"]["normalised"] = stats.normalise(m["summary"]["mean"], ref)
    results["normalisation"] = (
        "(score - random-init mean) / (1 - random-init mean) per entry; mean / IQM over entries, "
        "stratified bootstrap 95 % interval (seeds resampled within entries)"
    )
    results["normalised"] = {
        model: stats.aggregate_normalised(v, refs, n_boot) for model, v in per_model.items()
    }
    return results


def stop_cell(runs: list[dict]) -> str:
    """How the trained runs ended: ``early k/n, best <steps> of <budget>`` with early stopping
    (k runs stopped by patience; the step of each run's best validation score), ``budget``
    (every run used its steps; no validation), or ``n/a`` (probes)."""
    trained = [r for r in runs if r.get("stop")]
    if not trained:
        return "n/a"
    best = [r.get("best_step") for r in trained]
    if all(b is None for b in best):
        return "budget"
    early = sum(r["stop"] == "early" for r in trained)
    budgets = sorted({r.get("budget_steps") for r in trained if r.get("budget_steps")})
    of = f" of {'/'.join(map(str, budgets))}" if budgets else ""
    return f"early {early}/{len(trained)}, best {', '.join(map(str, best))}{of}"


def markdown(results: dict, wall_s: float) -> str:
    seeds = results["seeds"]
    shown = [m for m in results["models"]
             if any(m in r.get("models", {}) for r in results["entries"])]  # fmt: skip
    lines = [
        f"# Benchmark `{results['suite']}`",
        "",
        f"Seeds {seeds}; wall time {wall_s:.0f} s. Models: {', '.join(shown) or 'none ran'}.",
    ]
    if results.get("note"):
        lines.append(f"Note: {results['note']}.")
    lines += [
        "",
        "| entry | model | metric | mean | IQM | 95 % CI | seeds | norm. | plateaued | stop | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    absent = []
    for rec in results["entries"]:
        if rec["status"] != "ok":
            absent.append(f"- `{rec['id']}`: {rec['status']} ({rec.get('reason', '')})")
            continue
        for model, m in rec["models"].items():
            s = m["summary"]
            ci = s["ci95"]
            lines.append(
                f"| {rec['id']} | {model} | {s['metric'] or 'n/a'} | {_fmt(s['mean'])} | "
                f"{_fmt(s['iqm'])} | [{_fmt(ci[0])}, {_fmt(ci[1])}] | {s['n']}/{len(seeds)} | "
                f"{_fmt(s['normalised'])} | {s['plateaued']} | {s['stop']} | "
                f"{_fmt(s['seconds'], 1)} |"
            )
            for err in s["errors"]:
                absent.append(f"- `{rec['id']}` / {model}: {err}")
    lines += [
        "",
        "Columns: the entry's headline metric over seeds (mean, IQM, percentile-bootstrap 95 % "
        "interval of the mean); norm. = (mean - random-init mean) / (1 - random-init mean); "
        "plateaued = runs whose optimisation had flattened (linear probe: L-BFGS reached its "
        "gradient tolerance; fine-tuning and U-Net with early stopping: the validation score "
        "had not improved for `patience` evaluations by the end of the run; without: the mean "
        "loss of the last 20 % of steps within 5 % of the 20 % before; k-NN: n/a); stop = how "
        "the trained runs ended (early k/n: stopped by patience; best: the step of each run's "
        "best validation score, whose weights were scored; budget: all steps, no validation). "
        "Rows: `random init` = the encoder at random "
        "initialisation (drawn per seed); `spectral` = per-band mean and std of the image (or "
        "the pixel's bands) into the entry's probe (a linear probe beside fine-tuning entries); "
        "`unet` = a U-Net trained from scratch with the same crops, loss and steps.",
    ]
    lines += ["", "## Normalised score across entries", "", results["normalisation"] + ".", ""]
    lines += ["| model | entries | mean | IQM | 95 % CI |", "|---|---|---|---|---|"]
    for model, agg in results["normalised"].items():
        ci = agg["ci95"]
        lines.append(
            f"| {model} | {len(agg['entries'])} | {_fmt(agg['mean'])} | {_fmt(agg['iqm'])} | "
            f"[{_fmt(ci[0])}, {_fmt(ci[1])}] |"
        )
    if absent:
        lines += ["", "## Not run", "", *absent]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["entries"] if r["status"] == "ok" and r["models"]]
    n = max(1, len(ok))
    fig, axes = plt.subplots(n, 1, figsize=(7, 0.5 + 0.45 * len(results["models"]) * n + 0.6 * n))
    axes = [axes] if n == 1 else list(axes)
    for ax, rec in zip(axes, ok):
        names = list(rec["models"])
        for i, model in enumerate(names):
            s = rec["models"][model]["summary"]
            if not s["n"]:
                continue
            lo, hi = s["ci95"]
            ax.errorbar(s["mean"], i, xerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o",
                        capsize=4, color="C0")  # fmt: skip
            ax.plot(s["values"], [i] * len(s["values"]), "x", color="C1", alpha=0.7)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.5, len(names) - 0.5)
        metric = next((m["summary"]["metric"] for m in rec["models"].values()
                       if m["summary"]["metric"]), "score")  # fmt: skip
        ax.set_xlabel(f"{metric} (mean, 95 % bootstrap CI; x: seeds)")
        ax.set_title(rec["id"], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    if not ok:
        axes[0].text(0.5, 0.5, "no entry ran", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, run_dir: Path, n_boot: int = 10000, wall_s: float = 0.0) -> dict:
    from skysense.tasks.downstream.run import write_json

    summarise(results, n_boot)
    results["wall_seconds"] = wall_s
    text = markdown(results, wall_s)
    results["table"] = text
    results["files"] = {k: str(run_dir / f"report.{k}") for k in ("md", "json", "png")}
    (run_dir / "report.md").write_text(text)
    plot(results, run_dir / "report.png")
    write_json(run_dir / "report.json", results)
    return results

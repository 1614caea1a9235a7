"""The table of the ahead-of-time compile tier (``aot``): per kernel x configuration x target,
registers per thread, spilled bytes, shared memory per block and occupancy, as Markdown and
JSON (``bench/results/gpu-compile.md`` / ``.json``), and the command line:

    python -m skysense.kernels.aot_report --level full --out bench/results/gpu-compile
    python -m skysense.kernels.aot_report --native        # the card present (bench/gpu/run.sh)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from skysense.kernels.aot import TARGETS, Case, Result, cases, compile_all, problems

# --- the table -----------------------------------------------------------------------------------


def native_target() -> int:
    """Register the card present as a target (its own limits) and return its cc (e.g. 90)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    p = torch.cuda.get_device_properties(0)
    TARGETS[cc] = dict(
        name=f"sm_{cc} ({p.name})",
        smem_block=int(p.shared_memory_per_block_optin),
        smem_sm=int(p.shared_memory_per_multiprocessor),
        regs=int(getattr(p, "regs_per_multiprocessor", 65536)),
        warps=int(p.max_threads_per_multi_processor) // 32,
    )
    return cc


def _row_key(c: Case):
    return (c.kernel, c.dtype, c.prec, c.dim, c.rows, c.cols, c.flags, c.default)


def rows(results: list[Result]) -> list[dict]:
    """One row per case, the targets side by side: the JSON table."""
    out: dict[tuple, dict] = {}
    for r in results:
        c = r.case
        row = out.setdefault(
            _row_key(c),
            dict(
                kernel=c.kernel,
                dtype=c.dtype,
                prec=c.prec,
                dim=c.dim,
                lengths=f"{c.rows}x{c.cols}",
                flags=list(c.flags),
                default=c.default,
                launch=r.launch,
                targets={},
            ),
        )
        row["targets"][f"sm_{c.cc}"] = dict(
            regs=r.regs,
            spill_stores=r.spill_stores,
            spill_loads=r.spill_loads,
            stack=r.stack,
            shared=r.shared,
            warps_per_sm=r.occupancy,
            limiter=r.limiter,
            notes=r.notes,
            error=r.error,
            driver=r.driver,
        )
    return list(out.values())


def _cell(t: dict | None) -> list[str]:
    if t is None:
        return ["", "", "", ""]
    if t["error"]:
        return ["error", "", "", ""]
    spill = t["spill_stores"] + t["spill_loads"]
    note = " (w)" if "wgmma serialized" in t["notes"] else ""
    return [
        f"{t['regs']}{note}",
        str(spill) if spill else "0",
        f"{t['shared'] / 1024:.1f}",
        f"{t['warps_per_sm']} ({t['limiter'][:3]})",
    ]


def markdown(results: list[Result], header: str) -> str:
    """The Markdown table: per kernel x configuration, each target's registers per thread,
    spilled bytes (stores + loads), shared memory per block (KiB) and warps per SM."""
    table = rows(results)
    ccs = sorted({r.case.cc for r in results})
    failed = [p for r in results for p in problems(r)]
    lines = [header, ""]
    for cc in ccs:
        sub = [r for r in results if r.case.cc == cc and not r.error]
        d = [r for r in sub if r.case.default]
        if d:
            lines.append(
                f"- {TARGETS[cc]['name']}: {len(sub)} kernels compiled; default configurations: "
                f"registers {min(r.regs for r in d)}-{max(r.regs for r in d)} per thread, "
                f"{sum(1 for r in d if r.spills)} spill, shared memory up to "
                f"{max(r.shared for r in d) / 1024:.1f} KiB of "
                f"{TARGETS[cc]['smem_block'] / 1024:.0f} KiB, occupancy "
                f"{min(r.occupancy for r in d)}-{max(r.occupancy for r in d)} warps per SM "
                f"(median {sorted(r.occupancy for r in d)[len(d) // 2]}); all configurations: "
                f"{sum(1 for r in sub if r.spills)} spill"
            )
    lines.append(f"- problems: {len(failed)}" + "".join(f"\n  - {p}" for p in failed))
    lines += [
        "",
        "Columns per target: registers per thread ((w): ptxas serialised the wgmma pipeline), "
        "spilled bytes (stores + loads), shared memory per block in KiB, resident warps per SM "
        "(and what limits it: reg(isters), sha(red memory), war(ps)). `default`: a table entry "
        "at full size (spills fail the tier there); otherwise a block shrunk to short lengths "
        "or a bias / mask variant.",
        "",
    ]
    head = ["kernel", "dtype / dot", "dim", "lengths", "flags", "default", "launch"]
    for cc in ccs:
        head += [f"sm_{cc} regs", "spill B", "smem KiB", "warps/SM"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in table:
        cells = [
            row["kernel"],
            f"{row['dtype']} / {row['prec']}",
            str(row["dim"]),
            row["lengths"],
            ",".join(row["flags"]) or "-",
            "yes" if row["default"] else "",
            row["launch"],
        ]
        for cc in ccs:
            cells += _cell(row["targets"].get(f"sm_{cc}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import subprocess

    import triton
    from triton import knobs

    out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if "release" in ln] or out.stdout.splitlines()
    ptxas = "ptxas " + (lines[-1].split("release")[-1].strip(" ,") if lines else "?")
    return {"triton": triton.__version__, "ptxas": ptxas}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m skysense.kernels.aot",
        description="Compile every Triton kernel launch for sm_80 / sm_90 (or the card present) "
        "and print registers, spills, shared memory and occupancy.",
    )
    ap.add_argument("--level", choices=("ci", "full"), default="ci")
    ap.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--native", action="store_true", help="the card present (and its driver)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    ap.add_argument("--only", default="", help="kernel name prefixes, comma-separated")
    args = ap.parse_args(argv)
    ccs = [native_target()] if args.native else [int(t) for t in args.targets.split(",")]
    todo = cases(tuple(ccs), args.level)
    if args.only:
        todo = [c for c in todo if c.kernel.startswith(tuple(args.only.split(",")))]
    t0 = time.perf_counter()
    results = compile_all(todo, args.workers, native=args.native)
    wall = time.perf_counter() - t0
    v = versions()
    header = (
        f"# Triton kernels compiled ahead of time ({', '.join(TARGETS[c]['name'] for c in ccs)})"
        f"\n\n`python -m skysense.kernels.aot_report --level {args.level}"
        f"{' --native' if args.native else ''}`: {len(results)} compilations in {wall:.0f} s "
        f"with {args.workers} workers, Triton {v['triton']}, {v['ptxas']}."
    )
    text = markdown(results, header)
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump(
                dict(
                    level=args.level,
                    targets={f"sm_{c}": TARGETS[c] for c in ccs},
                    versions=v,
                    wall_s=round(wall, 1),
                    workers=args.workers,
                    rows=rows(results),
                ),
                f,
                indent=1,
            )
    return 1 if any(problems(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

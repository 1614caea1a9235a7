"""bench/gpu/check_kernels.py in its --dry-run: the GPU script's own code path (checks against
the references, timing, the table, the output file) on CPU tensors under the interpreter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "check_kernels.py"


@pytest.mark.triton
@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_passing_table(triton_cpu, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("check_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check_kernels", mod)  # dataclasses look it up there
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu-kernels.txt"
    rc = mod.main(["--dry-run", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    ops = {r.split("|")[1].strip() for r in rows}
    assert ops == {"attention", "info_nce", "prototype_ce", "sinkhorn"}
    assert all("| PASS |" in r for r in rows), text
    assert {"float16", "bfloat16"} <= {r.split("|")[3].strip() for r in rows}

"""The gpu_compile tier: every Triton kernel compiled ahead of time for sm_80 (A100) and sm_90
(H100/H200) at every launch configuration of the tables the launchers read
(``skysense.kernels.launch_configs``), with the ptxas that ships with Triton, on this CPU.

Fails on a compile error, on shared memory above the target's per-block limit and on register
spills in a default configuration; checks the checker itself with a deliberately oversized
block and a known spilling one, and that the committed table (bench/results/gpu-compile.json)
holds the figures this Triton produces.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from skysense.kernels import aot
from skysense.kernels import launch_configs as lc

pytestmark = pytest.mark.gpu_compile

TABLE = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu-compile.json"
REGENERATE = "python -m skysense.kernels.aot_report --level full --out bench/results/gpu-compile"


def _ptxas_reason() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception as e:  # no NVIDIA backend in this Triton
        return f"Triton has no NVIDIA backend here ({type(e).__name__}: {e})"
    if not path or not shutil.which(path):
        return f"Triton's ptxas not found ({path})"
    return None


@pytest.fixture(scope="module")
def compiled():
    reason = _ptxas_reason()
    if reason:
        pytest.skip(reason)
    todo = aot.cases((80, 90), "ci")
    t0 = time.perf_counter()
    results = aot.compile_all(todo, workers=2)
    wall = time.perf_counter() - t0
    print(f"\ngpu_compile: {len(results)} kernels compiled for sm_80 and sm_90 in {wall:.0f} s")
    return results


def test_every_launch_compiles_fits_and_does_not_spill(compiled):
    aot.check(compiled)  # raises with every problem listed


def test_every_table_entry_is_compiled_for_both_targets(compiled):
    done = {(r.case.kernel, r.case.cc, r.launch) for r in compiled if r.case.default}
    missing = []
    for cc in (80, 90):
        for kernel, table in lc.ATTENTION.items():
            for (block_d, width), launch in table.items():
                full = launch.with_blocks(BLOCK_D=block_d).label
                if (kernel, cc, full) not in done:
                    missing.append(f"{kernel} sm_{cc} {full} (width {width})")
        for kernel, table in lc.LOSSES.items():
            for launch in table.values():
                if (kernel, cc, launch.label) not in done:
                    missing.append(f"{kernel} sm_{cc} {launch.label}")
    assert not missing, "table entries the tier never compiled:\n" + "\n".join(missing)


def test_head_dims_16_to_256_and_44_in_every_dtype(compiled):
    for kernel in aot.ATTENTION_KERNELS:
        for dt, _ in aot.CI_MODES:
            dims = {r.case.dim for r in compiled if r.case.kernel == kernel and r.case.dtype == dt}
            assert {16, 32, 44, 64, 128, 256} <= dims, (kernel, dt, dims)


def test_committed_table_matches_this_triton(compiled):
    """bench/results/gpu-compile.json is the full level of this tier; its figures for every
    case compiled here must be the ones this Triton and ptxas produce."""
    assert TABLE.exists(), f"{TABLE} missing: run {REGENERATE}"
    committed = json.loads(TABLE.read_text())
    import triton

    if committed["versions"]["triton"] != triton.__version__:
        pytest.skip(
            f"the table was made with Triton {committed['versions']['triton']}, this is "
            f"{triton.__version__} (constraints.txt pins the one CI uses)"
        )
    index = {}
    for row in committed["rows"]:
        for target, fig in row["targets"].items():
            key = (row["kernel"], row["dtype"], row["prec"], row["dim"], row["lengths"])
            index[(*key, tuple(row["flags"]), target)] = (row["launch"], fig)
    stale = []
    for r in compiled:
        c = r.case
        key = (c.kernel, c.dtype, c.prec, c.dim, f"{c.rows}x{c.cols}", c.flags, f"sm_{c.cc}")
        if key not in index:
            stale.append(f"{c.label}: not in the table")
            continue
        launch, fig = index[key]
        got = (r.launch, r.regs, r.spill_stores + r.spill_loads, r.shared)
        want = (launch, fig["regs"], fig["spill_stores"] + fig["spill_loads"], fig["shared"])
        if got != want:
            stale.append(f"{c.label}: table {want}, compiled now {got}")
    assert not stale, f"the committed table is stale; run {REGENERATE}:\n" + "\n".join(stale)


# --- the checker fails where it must ---------------------------------------------------------


def test_oversized_block_fails_the_tier():
    reason = _ptxas_reason()
    if reason:
        pytest.skip(reason)
    big = lc.Launch((("BLOCK_M", 128), ("BLOCK_N", 128), ("BLOCK_D", 256)), 8, 4)
    case = aot.Case("nce_lse", "bfloat16", "ieee", 256, 300, 1000, (), 90, True, big)
    (res,) = aot.compile_all([case], workers=1)
    assert not res.error, res.error
    assert res.shared > aot.TARGETS[90]["smem_block"], res.shared
    assert res.occupancy == 0
    with pytest.raises(aot.TierFailure, match=r"bytes of shared memory > 232448 per block"):
        aot.check([res])


def test_spilling_default_configuration_fails_the_tier():
    """The forward's former entry for head dim 32 (128 x 64 queries x keys, 4 warps, 3
    stages) spills with two biases and a mask: a default configuration may not."""
    reason = _ptxas_reason()
    if reason:
        pytest.skip(reason)
    old = lc.Launch((("BLOCK_M", 128), ("BLOCK_N", 64)), 4, 3)
    case = aot.Case("attn_fwd", "bfloat16", "ieee", 32, 197, 197, aot.HEAVY, 90, True, old)
    (res,) = aot.compile_all([case], workers=1)
    assert res.spills > 0 and res.regs == aot.MAX_REGS_PER_THREAD, (res.regs, res.spills)
    with pytest.raises(aot.TierFailure, match="spills registers"):
        aot.check([res])
    shrunk = aot.Result(aot.Case(*[getattr(case, f) for f in ("kernel", "dtype", "prec", "dim",
                                   "rows", "cols", "flags", "cc")], default=False))  # fmt: skip
    for f in ("launch", "num_warps", "regs", "spill_stores", "spill_loads", "shared"):
        setattr(shrunk, f, getattr(res, f))
    shrunk.occupancy = res.occupancy
    aot.check([shrunk])  # spills outside the default configurations are reported, not failed


# --- pure helpers ------------------------------------------------------------------------------


def test_occupancy_from_registers_shared_memory_and_warps():
    # 255 registers: 8160 per warp rounds to 8192, 65536 / 8192 = 8 warps = one 8-warp block.
    assert aot.occupancy(255, 0, 8, 90) == (8, "registers")
    # 128 registers, 4 warps: 16 warps by registers; 48 KiB + 1 KiB reserved: 3 blocks of
    # 167936 bytes on sm_80 -> 12 warps, limited by shared memory.
    assert aot.occupancy(128, 48 * 1024, 4, 80) == (12, "shared")
    # 32 registers, tiny shared memory, 4 warps: 16 blocks by warps (64 / 4).
    assert aot.occupancy(32, 1024, 4, 90) == (64, "warps")
    # Above the per-block limit nothing runs.
    assert aot.occupancy(64, 232449, 4, 90)[0] == 0


def test_parse_ptxas_verbose_output():
    log = (
        "ptxas info    : Function properties for _k\n"
        "    208 bytes stack frame, 352 bytes spill stores, 272 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 208 bytes cumulative stack size\n"
    )
    assert aot.parse_ptxas(log) == dict(regs=255, stack=208, spill_stores=352, spill_loads=272)
    with pytest.raises(ValueError, match="no 'regs'"):
        aot.parse_ptxas("ptxas info    : Compile time = 1 ms")


def test_launchers_take_their_blocks_from_the_tables(triton_cpu):
    """Under ``gpu_blocks`` the launchers build the launches of the tables (the interpreter's
    own big blocks otherwise): what the tier compiles is what they launch."""
    import torch

    from skysense.kernels import triton_attention as ta
    from skysense.kernels import triton_losses as tls

    q = torch.empty(2, 3, 49, 44, dtype=torch.bfloat16)
    lse = torch.empty(2, 3, 49)
    with lc.gpu_blocks():
        call = ta.forward_call(q, q, q, q, lse, [], None, 0.1)
        want = lc.attention_launch("attn_fwd", 44, "bfloat16", 49, 49)
        assert {k: call.meta[k] for k in want.meta} == want.meta
        assert (call.meta["num_warps"], call.meta["num_stages"]) == (
            want.num_warps,
            want.num_stages,
        )
        x = torch.empty(70, 20, dtype=torch.float32)
        call = tls.nce_lse_call(x, x, torch.empty(70), 10.0)
        want = lc.loss_launch("nce_lse", "float32", 70, 70, 20)
        assert {k: call.meta[k] for k in want.meta} == want.meta
    call = ta.forward_call(q, q, q, q, lse, [], None, 0.1)
    assert call.meta["BLOCK_M"] == 64 and call.meta["num_warps"] == 4  # the interpreter's

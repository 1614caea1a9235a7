"""Ahead-of-time compilation of the Triton kernels for real GPUs, without one.

Triton compiles to PTX and cubin on a CPU-only machine (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, with the ``ptxas`` that ships with Triton). For each
:class:`Case` (a kernel, operand dtype and matmul precision, head or feature dim, lengths,
biases / mask / flags, target) this module builds the launch exactly as the launchers do
(``triton_attention.forward_call`` and friends, on small example CPU tensors, so the
specialisation of every argument is the JIT's), compiles it, and reads what a card would care
about: registers per thread, spilled bytes and stack (``ptxas -v``), shared memory per block
(the compiled kernel's metadata) and the resulting occupancy in warps per SM.

Compilation runs in worker processes (``TRITON_INTERPRET`` off there, a fresh Triton cache per
run, so a clean clone's cold cache is what is timed).

The table and the command line are in ``aot_report``
(``python -m skysense.kernels.aot_report --level full --out bench/results/gpu-compile``;
``--native`` compiles for the card present and adds the driver's own figures).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from skysense.kernels import launch_configs as lc

# Per target: shared memory a block may opt in to, shared memory per SM (each resident block
# also reserves 1 KiB), the register file, and the warp and block limits of one SM.
TARGETS = {
    80: dict(name="sm_80 (A100)", smem_block=166912, smem_sm=167936, regs=65536, warps=64),
    90: dict(name="sm_90 (H100/H200)", smem_block=232448, smem_sm=233472, regs=65536, warps=64),
}
MAX_BLOCKS_PER_SM = 32
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_REGS_PER_THREAD = 255

ATTENTION_KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
LOSS_KERNELS = ("nce_lse", "nce_grad", "proto_fwd", "proto_dx", "proto_dw")
SINKHORN_KERNELS = ("sk_colsum", "sk_rowsum", "sk_write")
# (operand dtype, tl.dot precision): fp32 runs as "ieee" unless torch allows TF32 matmuls.
MODES = (("float16", "ieee"), ("bfloat16", "ieee"), ("float32", "ieee"), ("float32", "tf32"))
HEAD_DIMS = (16, 32, 44, 64, 128, 256)  # 44 (Swin-H) pads to 64 with masked loads
FULL = 197  # a length that fills every block (and is no multiple of 16)


@dataclass(frozen=True)
class Case:
    """One compilation: ``kernel`` (a key of launch_configs.ATTENTION / LOSSES), operand
    ``dtype`` name, ``prec`` of tl.dot, ``dim`` (head dim; loss feature dim), ``rows`` x
    ``cols`` (Nq x Nk; rows x cols of the similarities; N x K), ``flags`` (attention: bias
    kinds, ``+g`` where the bias needs a gradient, and ``mask``; losses: ``use_x``, ``use_y``,
    ``center``) and ``cc`` (80 or 90). ``default``: the table entry itself at full size (spills
    fail there), otherwise a block shrunk to short lengths or a bias / mask variant."""

    kernel: str
    dtype: str
    prec: str
    dim: int
    rows: int
    cols: int
    flags: tuple[str, ...]
    cc: int
    default: bool = True
    override: lc.Launch | None = None  # replaces the kernel's table entry (tuning, tests)

    @property
    def label(self) -> str:
        f = ",".join(self.flags) or "-"
        extra = f" override {self.override.label}" if self.override else ""
        return (
            f"{self.kernel} {self.dtype}/{self.prec} d{self.dim} {self.rows}x{self.cols} "
            f"[{f}] sm_{self.cc}{extra}"
        )


@dataclass
class Result:
    case: Case
    launch: str = ""
    num_warps: int = 0
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    occupancy: int = 0  # warps per SM
    limiter: str = ""
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    driver: dict = field(default_factory=dict)  # n_regs / n_spills from a real driver

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


# --- what the tier compiles ------------------------------------------------------------------


def attention_flag_sets(kernel: str) -> list[tuple[str, ...]]:
    """Every bias / mask combination the attention launchers distinguish for ``kernel``: no
    bias, one, two (periodic shift mask as the second), each with and without a padding mask;
    for the dk/dv kernel also each gradient reduction (a bias broadcast over queries, keys,
    both, or none) with and without a gradient."""
    base = [(), ("rel",), ("rel", "shift")]
    if kernel == "attn_bwd_dkdv":
        one = ["rel", "rel+g", "keys+g", "queries+g", "head+g"]
        base = [()] + [(b,) for b in one]
        base += [(b, "shift") for b in one] + [(b, "shift+g") for b in one]
        base += [("full+g", "keys+g"), ("queries+g", "head+g")]
    return [f for b in base for f in (b, (*b, "mask"))]


HEAVY = ("rel+g", "shift+g", "mask")  # two biases with full gradients and a mask


CI_MODES = (("bfloat16", "ieee"), ("float32", "ieee"))


def cases(targets=(80, 90), level: str = "ci") -> list[Case]:
    """The compilations of the tier, in the order to run them.

    ``ci`` (``make test``): every table entry at full size with the heaviest flags (two
    biases with full gradients and a padding mask; every flag of the loss kernels), for bf16
    and fp32 (IEEE dots), attention head dims 16 to 256 and 44, both targets. The fp16 and
    TF32 dots use the same table entries (same tile sizes and operand widths).

    ``full`` (the committed table, ``--level full``) adds fp16 and fp32 with TF32 dots, every
    bias / mask / gradient combination (bf16, head dim 64), the blocks the length clamp makes
    for short sequences (49 and 7 tokens; 7 rows, 40 columns, 20 features for the losses), and
    the loss kernels at a feature dim of 44 (reported, not failed: the loss tables are proven
    for feature dims that are multiples of 16, where every row is 16-byte aligned; an odd
    dim loads element by element and some of its launches spill on sm_80)."""
    modes = CI_MODES if level == "ci" else MODES
    out: list[Case] = []
    for cc in targets:
        for kernel in ATTENTION_KERNELS:
            for dt, prec in modes:
                for d in HEAD_DIMS:
                    out.append(Case(kernel, dt, prec, d, FULL, FULL, HEAVY, cc))
                    if level == "full" and (dt, prec) in CI_MODES:
                        for n in (49, 7):
                            out.append(Case(kernel, dt, prec, d, n, n, HEAVY, cc, False))
            if level == "full":
                for flags in attention_flag_sets(kernel):
                    if flags != HEAVY:
                        out.append(
                            Case(kernel, "bfloat16", "ieee", 64, FULL, FULL, flags, cc, False)
                        )
        for kernel in LOSS_KERNELS:
            flag_sets = {
                "nce_lse": [()],
                "nce_grad": [("use_x", "use_y"), ("use_x",), ("use_y",)],
                "proto_fwd": [("center",), ()],
                "proto_dx": [("center",), ()],
                "proto_dw": [("center",), ()],
            }[kernel]
            for dt, prec in modes:
                out.append(Case(kernel, dt, prec, 256, 300, 1000, flag_sets[0], cc))
                if level == "full":
                    for flags in flag_sets[1:]:
                        out.append(Case(kernel, dt, prec, 256, 300, 1000, flags, cc, False))
                    out.append(Case(kernel, dt, prec, 44, 300, 1000, flag_sets[0], cc, False))
                    if (dt, prec) in CI_MODES:
                        out.append(Case(kernel, dt, prec, 20, 7, 40, flag_sets[0], cc, False))
        for kernel in SINKHORN_KERNELS:
            for dt in ("bfloat16",) if level == "ci" else ("float16", "bfloat16", "float32"):
                out.append(Case(kernel, dt, "ieee", 0, 300, 1000, (), cc))
                if level == "full":
                    out.append(Case(kernel, dt, "ieee", 0, 7, 40, (), cc, False))
    return list(dict.fromkeys(out))


# --- building the launch as the launchers do ---------------------------------------------------


def _bias_tensor(kind: str, B: int, H: int, Nq: int, Nk: int):
    import torch

    shape = {
        "rel": (1, H, Nq, Nk),
        "shift": (2, 1, Nq, Nk),
        "full": (B, H, Nq, Nk),
        "keys": (B, 1, 1, Nk),
        "queries": (H, Nq, 1),
        "head": (H, 1, 1),
    }[kind]
    return torch.zeros(shape, dtype=torch.float32)


@contextlib.contextmanager
def _table_override(case: Case):
    """Replace the table entry ``case`` would use by ``case.override`` for the duration."""
    if case.override is None:
        yield
        return
    if case.kernel in lc.ATTENTION:
        table, key = lc.ATTENTION[case.kernel], (lc.head_block(case.dim), lc.width(case.dtype))
    else:
        table = lc.LOSSES[case.kernel]
        key = 0 if 0 in table else lc.width(case.dtype)
    old = table[key]
    table[key] = case.override
    try:
        yield
    finally:
        table[key] = old


def build_call(case: Case):
    """The ``launch_configs.Call`` the launchers make for ``case`` (example CPU tensors)."""
    with _table_override(case):
        return _build_call(case)


def _build_call(case: Case):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = case.prec == "tf32"
    dt = getattr(torch, case.dtype)
    e = lambda *s, dtype=dt: torch.empty(s, dtype=dtype)  # noqa: E731
    if case.kernel in ATTENTION_KERNELS:
        from skysense.kernels import triton_attention as ta

        B, H, Nq, Nk, D = 2, 4, case.rows, case.cols, case.dim
        q, k, v, o, do = (
            e(B, H, Nq, D),
            e(B, H, Nk, D),
            e(B, H, Nk, D),
            e(B, H, Nq, D),
            e(B, H, Nq, D),
        )
        lse, delta = e(B, H, Nq, dtype=torch.float32), e(B, H, Nq, dtype=torch.float32)
        kinds = [f for f in case.flags if f != "mask"]
        specs, dbs = [], []
        for i, kind in enumerate(kinds):
            t = _bias_tensor(kind.removesuffix("+g"), B, H, Nq, Nk)
            s = ta.bias_spec(t, i, B, H, Nq, Nk)
            specs.append(s)
            dbs.append(torch.zeros(s.grad_shape) if kind.endswith("+g") else None)
        mask = torch.zeros(B, Nk, dtype=torch.bool) if "mask" in case.flags else None
        if case.kernel == "attn_fwd":
            return ta.forward_call(q, k, v, o, lse, specs, mask, 0.125)
        calls = ta.backward_calls(do, q, k, v, lse, delta, e(*q.shape), e(*k.shape), e(*v.shape),
                                  specs, dbs, mask, 0.125)  # fmt: skip
        return calls[0] if case.kernel == "attn_bwd_dkdv" else calls[1]
    from skysense.kernels import triton_losses as tls

    n, m, d = case.rows, case.cols, case.dim
    f32 = lambda *s: torch.empty(s, dtype=torch.float32)  # noqa: E731
    if case.kernel == "nce_lse":
        return tls.nce_lse_call(e(n, d), e(m, d), f32(n), 10.0)
    if case.kernel == "nce_grad":
        lx = f32(n) if "use_x" in case.flags else None
        ly = f32(m) if "use_y" in case.flags else None
        return tls.nce_grad_call(e(n, d), e(m, d), lx, ly, f32(n, d), 10.0)
    center = f32(m) if "center" in case.flags else None
    sx, w = e(n, d), e(m, d)
    if case.kernel == "proto_fwd":
        return tls.proto_fwd_calls(sx, e(n, d), w, e(m, d), center, 10.0, 25.0)[0]
    if case.kernel in ("proto_dx", "proto_dw"):
        calls = tls.proto_bwd_calls(sx, e(n, d), w, e(m, d), center, 10.0, 25.0, f32(n), f32(n),
                                    f32(n, d), f32(m, d))  # fmt: skip
        return calls[0] if case.kernel == "proto_dx" else calls[1]
    scores = e(n, m)
    vec = f32(1, m) if case.kernel in ("sk_rowsum", "sk_write") else f32(n)
    out = {"sk_colsum": f32(1, m), "sk_rowsum": f32(n), "sk_write": e(n, m)}[case.kernel]
    from skysense.kernels import triton_sinkhorn as tsk

    layout = tsk.sinkhorn_groups(torch.zeros(n, dtype=torch.long, device=scores.device), 1)
    return tsk.sinkhorn_call(case.kernel, scores, f32(n), vec, out, 20.0, layout, c=f32(n))


def _source(call):
    """ASTSource of a Call: each argument specialised as the JIT specialises it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    fn = call.kernel
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, value in enumerate(call.args):
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[names[i]] = kind
        if kind == "constexpr":
            constexprs[names[i]] = value
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    options = {}
    for key, value in call.meta.items():
        if key in ("num_warps", "num_stages", "maxnreg"):
            options[key] = value
        else:
            signature[key] = "constexpr"
            constexprs[key] = value
    missing = [n for n in names if n not in signature]
    if missing:
        raise TypeError(f"{fn.__name__}: no value for {missing}")
    signature = {n: signature[n] for n in names}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, stack frame and spilled bytes from ``ptxas -v`` output."""
    out = {}
    for key, rx in _PTXAS.items():
        m = rx.search(log)
        if m is None:
            raise ValueError(f"ptxas -v output has no {key!r}:\n{log}")
        out[key] = int(m.group(1))
    return out


def occupancy(regs: int, shared: int, warps: int, cc: int) -> tuple[int, str]:
    """Resident warps per SM for a kernel of ``regs`` registers per thread, ``shared`` bytes of
    shared memory per block and ``warps`` per block on ``cc``, and what limits it."""
    t = TARGETS[cc]
    per_warp = math.ceil(max(1, regs) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "warps": t["warps"] // warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": (t["regs"] // per_warp) // warps,
        "shared": t["smem_sm"] // (shared + SMEM_RESERVED_PER_BLOCK)
        if shared <= t["smem_block"]
        else 0,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    return blocks * warps, limiter


def _ptxas_log(kernel_hash: str, printed: str) -> str:
    """ptxas's -v output for this kernel: ``printed`` when ptxas ran here; when Triton's cache
    already held the kernel (an identical launch compiled earlier in this run, in any
    worker), the copy that compilation left beside the cache."""
    path = os.path.join(os.environ.get("TRITON_CACHE_DIR", tempfile.gettempdir()), kernel_hash)
    if "Used" in printed:
        with open(path + ".tmp", "w") as f:
            f.write(printed)
        os.replace(path + ".tmp", path + ".ptxas")
        return printed
    for _ in range(600):  # the other worker writes it right after its compile returns
        if os.path.exists(path + ".ptxas"):
            with open(path + ".ptxas") as f:
                return f.read()
        time.sleep(0.1)
    return printed


def compile_case(case: Case, native: bool = False) -> Result:
    """Compile ``case`` (in a process with TRITON_INTERPRET off) and read its figures."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(case)
    t0 = time.perf_counter()
    try:
        call = build_call(case)
        res.launch = lc.Launch(
            tuple((k, v) for k, v in call.meta.items() if k.startswith("BLOCK_")),
            call.meta["num_warps"],
            call.meta["num_stages"],
            call.meta.get("maxnreg"),
        ).label
        res.num_warps = call.meta["num_warps"]
        src, options = _source(call)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(src, target=GPUTarget("cuda", case.cc, 32), options=options)
        text = _ptxas_log(kernel.hash, log.getvalue())
        for key, value in parse_ptxas(text).items():
            setattr(res, key, value)
        if "wgmma.mma_async instructions are serialized" in text:
            res.notes.append("wgmma serialized")
        res.shared = int(kernel.metadata.shared)
        if case.cc not in TARGETS:  # --native on a card other than sm_80 / sm_90 (a worker)
            from skysense.kernels.aot_report import native_target

            native_target()
        res.occupancy, res.limiter = occupancy(res.regs, res.shared, res.num_warps, case.cc)
        if native:
            kernel._init_handles()
            res.driver = {"n_regs": kernel.n_regs, "n_spills": kernel.n_spills}
    except Exception as e:  # a compile error is a finding, reported per case
        res.error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    res.seconds = time.perf_counter() - t0
    return res


def problems(res: Result) -> list[str]:
    """Why ``res`` would fail on its target: compile error, shared memory above the per-block
    limit, register spills in a default (table, full-size) configuration."""
    out = []
    if res.error:
        return [f"{res.case.label}: does not compile: {res.error}"]
    limit = TARGETS[res.case.cc]["smem_block"]
    if res.shared > limit:
        out.append(
            f"{res.case.label} ({res.launch}): {res.shared} bytes of shared memory > "
            f"{limit} per block on sm_{res.case.cc}"
        )
    if res.case.default and res.spills:
        out.append(
            f"{res.case.label} ({res.launch}): spills registers ({res.spill_stores} B stored, "
            f"{res.spill_loads} B loaded, {res.regs} registers)"
        )
    if res.occupancy == 0 and not out:
        out.append(f"{res.case.label} ({res.launch}): no block fits on an SM")
    return out


class TierFailure(AssertionError):
    """Some launch would fail or spill on a card (the message lists every problem)."""


def check(results: list[Result]) -> None:
    """Raise :class:`TierFailure` listing every problem of ``results`` (see :func:`problems`)."""
    found = [p for r in results for p in problems(r)]
    if found:
        raise TierFailure(
            f"{len(found)} problem(s) of {len(results)} compilations:\n" + "\n".join(found)
        )


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run_one(args):
    case, native = args
    return compile_case(case, native)


def compile_all(case_list: list[Case], workers: int = 2, native: bool = False) -> list[Result]:
    """Compile every case in ``workers`` fresh processes (spawned, interpreter off, a new empty
    Triton cache), in the order given."""
    with tempfile.TemporaryDirectory(prefix="skysense-aot-") as cache:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(workers, ctx, _worker_init, (cache,)) as pool:
            return list(pool.map(_run_one, [(c, native) for c in case_list], chunksize=4))


if __name__ == "__main__":
    from skysense.kernels.aot_report import main

    sys.exit(main())

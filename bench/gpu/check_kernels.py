"""One-shot GPU check of the skysense.kernels Triton kernels: correctness and speed.

On a machine with an NVIDIA GPU, for fp16 and bf16, every Triton kernel is checked against its
fp32 PyTorch reference (forward and backward) and timed (median of CUDA-event timings after a
warm-up) against ``scaled_dot_product_attention``, xformers (where one of its operators runs)
and the naive losses; peak CUDA memory is taken for the losses. Prints one table and, with
``--out`` (``run.sh`` passes $OUT/gpu-kernels.txt), writes it there too.

``--dry-run`` runs the same code path on CPU tensors under the Triton interpreter at tiny
sizes (the test suite exercises it), so the script is known to work before a GPU is at hand.

Usage: python bench/gpu/check_kernels.py [--dry-run] [--out FILE] [--only attention,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field


@dataclass
class Row:
    op: str
    config: str
    dtype: str
    err: str = ""
    ok: str = ""
    times: dict[str, float] = field(default_factory=dict)  # name -> ms (ours first)
    mem: str = ""
    note: str = ""
    ratio: str = ""  # baseline time / ours, > 1 = ours faster


TOL = {"float16": 2e-2, "bfloat16": 6e-2}  # max |err| / max(1, |ref|) tolerated per tensor


class Checker:
    def __init__(self, dry_run: bool, repeat: int):
        import torch

        self.torch = torch
        self.dry = dry_run
        self.dev = "cpu" if dry_run else "cuda"
        # The dry run checks the code path, not speed: one untimed-quality call each.
        self.repeat = 1 if dry_run else repeat
        self.warmup = 0 if dry_run else 3
        self.rows: list[Row] = []

    # -- measuring ---------------------------------------------------------------------------
    def time_ms(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        if self.dry:
            ts = []
            for _ in range(self.repeat):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        torch.cuda.synchronize()
        ts = []
        for _ in range(self.repeat):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    def peak_mib(self, fn) -> float | None:
        torch = self.torch
        if self.dry:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    @staticmethod
    def rel_err(got, want) -> float:
        got, want = got.detach().float(), want.detach().float()
        if not bool(got.isfinite().all()):
            return float("inf")
        scale = max(1.0, want.abs().max().item())
        return (got - want).abs().max().item() / scale

    def verdict(self, errs: dict[str, float], dtype) -> tuple[str, str]:
        tol = TOL[str(dtype).replace("torch.", "")]
        worst = max(errs.values())
        text = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        return text, "PASS" if worst <= tol else "FAIL"

    # -- attention ---------------------------------------------------------------------------
    def attention_configs(self):
        if self.dry:
            return [
                ("swin N=49 D=44 rel+shift", dict(B=4, H=1, N=49, D=44, swin=True, pad=False)),
                ("fusion N=32 D=64 pad", dict(B=2, H=1, N=32, D=64, swin=False, pad=True)),
            ]
        return [
            # Swin-H window attention: 8x8 windows, head dim 44, rel bias (grad) + shift mask
            ("swin N=64 D=44 rel+shift", dict(B=1024, H=8, N=64, D=44, swin=True, pad=False)),
            # fusion tokens per location with missing steps
            ("fusion N=32 D=64 pad", dict(B=4096, H=16, N=32, D=64, swin=False, pad=True)),
            ("vit N=1024 D=64", dict(B=16, H=16, N=1024, D=64, swin=False, pad=False)),
            ("long N=4096 D=64 pad", dict(B=2, H=16, N=4097, D=64, swin=False, pad=True)),
        ]

    def check_attention(self, dtype):
        for name, c in self.attention_configs():
            self._attention_case(name, c, dtype)

    def _attention_case(self, name, c, dtype):
        torch = self.torch
        from skysense.kernels import attention, force_backend, last_backend
        from skysense.kernels.attention import attention_reference, xformers_unavailable_reason

        B, H, N, D = c["B"], c["H"], c["N"], c["D"]
        q, k, v = (
            torch.randn(B, H, N, D, device=self.dev, dtype=dtype).requires_grad_() for _ in range(3)
        )
        biases = []
        if c["swin"]:
            nw = 4
            rel = torch.randn(1, H, N, N, device=self.dev, requires_grad=True)
            shift = torch.where(torch.rand(nw, 1, N, N, device=self.dev) < 0.2, -100.0, 0.0)
            biases = [rel, shift]
        mask = None
        if c["pad"]:
            mask = torch.rand(B, N, device=self.dev) < 0.25
            mask[0] = True  # one sample with every step missing
        leaves = [q, k, v] + [b for b in biases if b.requires_grad]
        g = torch.randn(B, H, N, D, device=self.dev, dtype=dtype)

        def run(backend):
            for t in leaves:
                t.grad = None
            with force_backend("attention", backend):
                out = attention(q, k, v, biases or None, mask)
            out.backward(g)
            return [out] + [t.grad for t in leaves]

        got = run("triton")
        assert last_backend("attention") == "triton"
        ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
        rb = [ref_leaves[3]] + biases[1:] if c["swin"] else []
        ref_out = attention_reference(*ref_leaves[:3], rb or None, mask)
        ref_out.backward(g.float())
        want = [ref_out] + [t.grad for t in ref_leaves]
        names = ["out", "dq", "dk", "dv", "dbias"][: len(want)]
        errs = {n: self.rel_err(a, b) for n, a, b in zip(names, got, want)}
        err, ok = self.verdict(errs, dtype)
        del ref_leaves, ref_out, want, got

        def fwd(backend):
            def f():
                with torch.no_grad(), force_backend("attention", backend):
                    attention(q, k, v, biases or None, mask)

            return f

        times = {"triton fwd": self.time_ms(fwd("triton"))}
        times["sdpa fwd"] = self.time_ms(fwd("sdpa"))
        xf = xformers_unavailable_reason(q, bool(biases) or mask is not None)
        times["xformers fwd"] = float("nan") if xf else self.time_ms(fwd("xformers"))
        times["triton f+b"] = self.time_ms(lambda: run("triton"))
        times["sdpa f+b"] = self.time_ms(lambda: run("sdpa"))
        note = "xformers: n/a" if xf else ""
        ratio = (
            f"sdpa/ours fwd x{times['sdpa fwd'] / times['triton fwd']:.2f}, "
            f"f+b x{times['sdpa f+b'] / times['triton f+b']:.2f}"
        )
        if not xf:
            ratio += f"; xformers/ours fwd x{times['xformers fwd'] / times['triton fwd']:.2f}"
        self.rows.append(Row("attention", name, str(dtype)[6:], err, ok, times, "", note, ratio))

    # -- losses ------------------------------------------------------------------------------
    def check_info_nce(self, dtype):
        torch = self.torch
        from skysense.kernels import force_backend, info_nce
        from skysense.kernels.losses import info_nce_reference

        n, d = (49, 44) if self.dry else (16384, 256)
        a = torch.nn.functional.normalize(torch.randn(n, d, device=self.dev), dim=1)
        b = torch.nn.functional.normalize(torch.randn(n, d, device=self.dev), dim=1)
        a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()

        def run(backend):
            def f():
                a.grad = b.grad = None
                with force_backend("info_nce", backend):
                    loss = info_nce(a, b, 0.1)
                loss.backward()
                return [loss, a.grad, b.grad]

            return f

        got = run("triton")()
        ar, br = (t.detach().float().requires_grad_() for t in (a, b))
        ref = info_nce_reference(ar, br, 0.1)
        ref.backward()
        errs = {
            n_: self.rel_err(x, y)
            for n_, x, y in zip(("loss", "da", "db"), got, (ref, ar.grad, br.grad))
        }
        err, ok = self.verdict(errs, dtype)
        del ar, br, ref, got
        times = {
            "triton f+b": self.time_ms(run("triton")),
            "naive f+b": self.time_ms(run("reference")),
        }
        mt, mn = self.peak_mib(run("triton")), self.peak_mib(run("reference"))
        mem = "" if mt is None else f"{mt:.0f} vs {mn:.0f} MiB"
        ratio = f"naive/ours x{times['naive f+b'] / times['triton f+b']:.2f}"
        self.rows.append(
            Row("info_nce", f"N={n} d={d}", str(dtype)[6:], err, ok, times, mem, "", ratio)
        )

    def check_prototype(self, dtype):
        torch = self.torch
        from skysense.kernels import force_backend, prototype_cross_entropy
        from skysense.kernels.losses import prototype_cross_entropy_reference

        n, d, k = (33, 20, 100) if self.dry else (4096, 256, 65536)
        sx = torch.randn(n, d, device=self.dev).to(dtype).requires_grad_()
        tx = torch.randn(n, d, device=self.dev).to(dtype)
        w = (torch.randn(k, d, device=self.dev) / d**0.5).to(dtype).requires_grad_()
        center = torch.randn(k, device=self.dev) * 0.1

        def run(backend):
            def f():
                sx.grad = w.grad = None
                with force_backend("prototype_cross_entropy", backend):
                    loss = prototype_cross_entropy(sx, tx, w, None, center)
                loss.backward()
                return [loss, sx.grad, w.grad]

            return f

        got = run("triton")()
        sr, wr = (t.detach().float().requires_grad_() for t in (sx, w))
        ref = prototype_cross_entropy_reference(sr, tx.float(), wr, None, center)
        ref.backward()
        errs = {
            n_: self.rel_err(x, y)
            for n_, x, y in zip(("loss", "dx", "dW"), got, (ref, sr.grad, wr.grad))
        }
        err, ok = self.verdict(errs, dtype)
        del sr, wr, ref, got
        times = {
            "triton f+b": self.time_ms(run("triton")),
            "naive f+b": self.time_ms(run("reference")),
        }
        mt, mn = self.peak_mib(run("triton")), self.peak_mib(run("reference"))
        mem = "" if mt is None else f"{mt:.0f} vs {mn:.0f} MiB"
        ratio = f"naive/ours x{times['naive f+b'] / times['triton f+b']:.2f}"
        self.rows.append(
            Row(
                "prototype_ce", f"N={n} d={d} K={k}", str(dtype)[6:], err, ok, times, mem, "", ratio
            )
        )

    def check_sinkhorn(self, dtype):
        torch = self.torch
        from skysense.kernels import force_backend, sinkhorn_knopp
        from skysense.kernels.losses import sinkhorn_knopp_reference

        n, k = (49, 65) if self.dry else (16384, 4096)
        f_ = torch.nn.functional.normalize
        scores = (
            f_(torch.randn(n, 32, device=self.dev), dim=1)
            @ f_(torch.randn(k, 32, device=self.dev), dim=1).t()
        ).to(dtype)

        def run(backend):
            def f():
                with force_backend("sinkhorn_knopp", backend):
                    return sinkhorn_knopp(scores, 3, 0.05)

            return f

        got = run("triton")()
        want = sinkhorn_knopp_reference(scores.float(), 3, 0.05)
        err, ok = self.verdict({"Q": self.rel_err(got, want)}, dtype)
        times = {
            "triton": self.time_ms(run("triton")),
            "chunked": self.time_ms(run("chunked")),
            "reference": self.time_ms(run("reference")),
        }
        ratio = f"reference/ours x{times['reference'] / times['triton']:.2f}"
        self.rows.append(
            Row("sinkhorn", f"N={n} K={k} it=3", str(dtype)[6:], err, ok, times, "", "", ratio)
        )

    # -- the table ---------------------------------------------------------------------------
    def table(self) -> str:
        lines = []
        for r in self.rows:
            ts = "  ".join(f"{k} {v:.3f}" for k, v in r.times.items())
            ratio = r.ratio
            lines.append(
                f"| {r.op} | {r.config} | {r.dtype} | {r.ok} | {r.err} | {ts} | {ratio} | "
                f"{r.mem} | {r.note} |"
            )
        head = (
            "| op | config | dtype | check | max rel err | median ms | baseline / ours | "
            "peak mem ours vs naive | note |\n|---|---|---|---|---|---|---|---|---|"
        )
        return head + "\n" + "\n".join(lines)


def _header(dry: bool) -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "missing"
    dev = "CPU (Triton interpreter, dry run)" if dry else torch.cuda.get_device_name(0)
    return (
        f"# skysense.kernels GPU check\n\ndevice: {dev}; torch {torch.__version__}; triton {tv}; "
        f"python {platform.python_version()}\n\nTimes: median of CUDA-event timings after "
        "warm-up (ms). Errors: max |ours - fp32 reference| / max(1, |reference|) per tensor.\n"
    )


def compiled_kernels(dry: bool) -> str:
    """The Triton kernels this run compiled on the card present: per kernel and launch
    (blocks, warps, stages), the driver's registers per thread and spills, shared memory and
    the resulting warps per SM (``skysense.kernels.aot.occupancy`` with the card's limits)."""
    if dry:
        return "## Compiled kernels\n\n(none: the interpreter compiles nothing)\n"
    from skysense.kernels import aot, triton_attention, triton_losses, triton_sinkhorn

    cc = aot.native_target()
    lines = [
        f"## Compiled kernels on {aot.TARGETS[cc]['name']}",
        "",
        "| kernel | blocks | warps | stages | regs | spills | smem KiB | warps/SM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mod in (triton_attention, triton_losses, triton_sinkhorn):
        for name in sorted(dir(mod)):
            fn = getattr(mod, name)
            if not name.endswith("_kernel") or not hasattr(fn, "device_caches"):
                continue
            for caches in fn.device_caches.values():
                for k in caches[0].values():
                    try:
                        consts = {
                            fn.arg_names[i[0]]: v
                            for i, v in k.src.constants.items()
                            if fn.arg_names[i[0]].startswith("BLOCK_")
                        }
                        blocks = "x".join(str(consts[b]) for b in sorted(consts))
                        md = k.metadata
                        occ, lim = aot.occupancy(k.n_regs, md.shared, md.num_warps, cc)
                        lines.append(
                            f"| {name} | {blocks} | {md.num_warps} | {md.num_stages} | "
                            f"{k.n_regs} | {k.n_spills} | {md.shared / 1024:.1f} | "
                            f"{occ} ({lim}) |"
                        )
                    except Exception as e:  # Triton internals moved: say so, keep the rest
                        lines.append(f"| {name} | ? | | | | | | {type(e).__name__}: {e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, Triton interpreter, tiny")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--only", default="attention,info_nce,prototype,sinkhorn")
    p.add_argument("--dtypes", default="float16,bfloat16")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("check_kernels: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    chk = Checker(args.dry_run, args.repeat)
    steps = {
        "attention": chk.check_attention,
        "info_nce": chk.check_info_nce,
        "prototype": chk.check_prototype,
        "sinkhorn": chk.check_sinkhorn,
    }
    failures = 0
    for name in args.only.split(","):
        for dtype in (getattr(torch, t) for t in args.dtypes.split(",")):
            t0 = time.perf_counter()
            try:
                steps[name](dtype)
            except Exception as e:  # record and go on: one table with everything that ran
                failures += 1
                traceback.print_exc()
                chk.rows.append(
                    Row(
                        name,
                        "-",
                        str(dtype)[6:],
                        "",
                        "ERROR",
                        {},
                        "",
                        f"{type(e).__name__}: {str(e)[:160]}",
                    )
                )
            print(
                f"[{name} {str(dtype)[6:]}: {time.perf_counter() - t0:.1f}s]",
                file=sys.stderr,
                flush=True,
            )
            if not args.dry_run:
                torch.cuda.empty_cache()
    text = _header(args.dry_run) + "\n" + chk.table() + "\n"
    try:
        text += "\n" + compiled_kernels(args.dry_run)
    except Exception as e:  # the figures are a bonus; the checks above decide the exit code
        text += f"\n## Compiled kernels\n\nnot read: {type(e).__name__}: {e}\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    bad = failures + sum(r.ok == "FAIL" for r in chk.rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

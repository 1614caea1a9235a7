"""One-shot GPU check of the full SkySense pre-training step at the base and huge presets.

On one NVIDIA GPU, for each preset, ``skysense.tasks.training.meta_arch.MetaArch.step`` (what
``skysense pretrain`` runs per batch: the teacher on both views, the student and SkySenseLoss,
backward, clipping, AdamW, EMA, GCPL) under bf16 autocast, on synthetic views batches of the
batch contract's shapes (``skysense.data.batch``: no data files). Per row: seconds per step
(median of timed steps after warm-up), samples/s, model FLOPs per step
(``torch.utils.flop_counter.FlopCounterMode`` over one step, as bench/benchlib.py counts them:
for that step attention runs on torch SDPA and the fused losses on their references, since the
counter cannot see into Triton kernels; with activation checkpointing the recomputed forward of
the checkpointed blocks is counted apart and left out: model FLOPs, not hardware FLOPs), MFU
against the bf16 ``torch.mm`` rate measured in the same run (8192^3, before and after the
presets, the mean), and peak CUDA memory. A configuration that runs out of memory is a row
saying so; the next, smaller one is tried (base: batch 8, 4, 2 without checkpointing, then
batch 2 with it; huge: batch 1 with activation checkpointing at the preset's tile, then at half
the tile).

The config is ``skysense pretrain``'s (conf/pretrain.yaml with model=<preset>): composed with
Hydra where it is installed, else read from the same YAML files (the GPU image has PyYAML but
neither Hydra nor OmegaConf; ``skysense.tasks.training.loop`` then imports against a stand-in
``omegaconf`` module that it only uses for type names).

``--dry-run`` runs the same code path on the CPU with the tiny preset at batch 2 with activation
checkpointing (bf16 autocast on the CPU, or ``--precision fp32``, which the test suite uses: the
CPU's bf16 is slow; a 1024^2 bf16 matmul), so the script is known to work before a GPU is at
hand.

Usage: python bench/gpu/check_pretrain.py [--dry-run] [--out FILE] [--presets base,huge]
       [--steps N] [--t2 10] [--t1 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import re
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # benchlib: the FLOP counter the CPU suite uses


@dataclass
class Row:
    preset: str
    batch: int
    hr_px: int
    s_px: int
    t2: int
    t1: int
    checkpointing: bool
    status: str = ""  # ok, OOM, ERROR
    step_s: float | None = None
    samples_per_s: float | None = None
    model_tflop: float | None = None  # per step
    recompute_tflop: float | None = None
    model_tflops: float | None = None  # per second
    mfu: float | None = None
    peak_gib: float | None = None
    params_m: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# -- the config --------------------------------------------------------------------------------


class AttrDict(dict):
    """A nested dict read like a DictConfig (``cfg.trainer.batch_size``, ``cfg.get(k, d)``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setattr__(self, key, value):
        self[key] = value

    @classmethod
    def wrap(cls, x):
        if isinstance(x, dict):
            return cls({k: cls.wrap(v) for k, v in x.items()})
        if isinstance(x, list):
            return [cls.wrap(v) for v in x]
        return x


def _stand_in_omegaconf() -> None:
    """Where OmegaConf is missing, a module of that name with the two names loop.py imports
    (it uses them for type hints and in checkpointing, which this script does not call)."""
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        mod = types.ModuleType("omegaconf")

        class OmegaConf:
            @staticmethod
            def to_container(cfg, resolve=True):
                return cfg

        mod.DictConfig = dict
        mod.OmegaConf = OmegaConf
        mod.MISSING = "???"  # conf/schema.py's dataclasses mark required fields with it
        sys.modules["omegaconf"] = mod


def _conf_dir() -> Path:
    try:
        from importlib import resources

        d = Path(str(resources.files("skysense.tasks.conf")))
        if (d / "pretrain.yaml").exists():
            return d
    except Exception:
        pass
    return REPO / "packages" / "tasks" / "src" / "skysense" / "tasks" / "conf"


_REF = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def _resolve(node, root):
    """``${a.b.c}`` references (the only interpolation the model/loss/optim/trainer groups use)."""
    if isinstance(node, dict):
        return {k: _resolve(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root) for v in node]
    if isinstance(node, str):
        m = _REF.match(node)
        if m:
            v = root
            for part in m.group(1).split("."):
                v = v[part]
            return _resolve(v, root)
        if "${" in node:
            raise ValueError(f"interpolation {node!r} is beyond this script's reader")
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def pretrain_config(preset: str, overrides: dict):
    """conf/pretrain.yaml with model=<preset> and ``overrides`` (dotted key -> value)."""
    try:
        from skysense.tasks.cli import compose

        cfg = compose(
            "pretrain", [f"model={preset}"] + [f"{k}={_hydra(v)}" for k, v in overrides.items()]
        )
        return cfg, "hydra"
    except ImportError:
        pass
    import yaml

    conf = _conf_dir()
    top = yaml.safe_load((conf / "pretrain.yaml").read_text())
    tree: dict = {k: v for k, v in top.items() if k != "defaults"}
    import dataclasses

    from skysense.tasks.conf.schema import OptimConfig, PretrainTrainerConfig, model_config

    # model=<preset>, optim=adamw and trainer=default are structured configs, not YAML files
    tree["model"] = dataclasses.asdict(model_config(preset))
    tree["optim"] = dataclasses.asdict(OptimConfig())
    tree["trainer"] = dataclasses.asdict(PretrainTrainerConfig())
    tree["loss"] = yaml.safe_load((conf / "loss" / "default.yaml").read_text()) or {}
    for k, v in overrides.items():
        _set(tree, k, v)
    return AttrDict.wrap(_resolve(tree, tree)), "yaml"


def _container(node) -> dict:
    """A plain dict of a config node (DictConfig resolved, or the yaml reader's AttrDict)."""
    if isinstance(node, dict):
        return dict(node)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _hydra(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


# -- synthetic views ---------------------------------------------------------------------------


def synthetic_views(b, hr_px, s_px, t2, t1, device, seed=0) -> dict:
    """Two views of the batch contract's shapes (skysense.data.batch), random normalised pixels:
    view 2 is view 1's crop moved by a quarter of its side (56 % shared area, cell-aligned),
    S2/S1 steps 0..T-1 in view 1 and 1..T in view 2 (T-1 steps matched)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    views = {}
    for v, shift in (("view1", 0), ("view2", 1)):
        x = {
            "hr": torch.randn(b, 3, hr_px, hr_px, generator=g),
            "hr_doy": torch.randint(1, 367, (b,), generator=g),
            "hr_pixel_valid": torch.ones(b, hr_px, hr_px, dtype=torch.bool),
            "latlon": torch.stack(
                [torch.rand(b, generator=g) * 120 - 60, torch.rand(b, generator=g) * 360 - 180], 1
            ),
        }
        for m, t, c in (("s2", t2, 10), ("s1", t1, 2)):
            x[m] = torch.randn(b, t, c, s_px, s_px, generator=g)
            x[f"{m}_doy"] = torch.randint(1, 367, (b, t), generator=g).sort(1).values
            x[f"{m}_valid"] = torch.ones(b, t, dtype=torch.bool)
            x[f"{m}_pixel_valid"] = torch.ones(b, t, s_px, s_px, dtype=torch.bool)
            x[f"{m}_index"] = (torch.arange(t) + shift).expand(b, t).contiguous()
        # A crop of side c in a tile of side 1.25 c at offset shift * c / 4 (normalised coords:
        # view -> tile, as affine_grid with align_corners=False).
        f, off = 1 / 1.25, shift * 0.25 / 1.25
        aff = torch.zeros(b, 2, 3)
        aff[:, 0, 0] = aff[:, 1, 1] = f
        aff[:, :, 2] = 2 * off + f - 1
        x["view_affine"] = aff
        views[v] = {k: t.to(device) for k, t in x.items()}
    return views


# -- measuring ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, dry: bool, steps: int):
        import torch

        self.torch = torch
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.steps = 1 if dry else steps
        self.warmup = 0 if dry else 1  # after the counted step, itself a warm-up
        self.precision = "bf16"
        self.mm_rates: list[float] = []
        self.config_source = "-"
        self.rows: list[Row] = []

    def sync(self):
        if not self.dry:
            self.torch.cuda.synchronize()

    def matmul_rate(self) -> float:
        """FLOP/s of a square torch.mm (8192^3 on the GPU, 1024^3 in the dry run) in the
        precision of the steps (bf16, or fp32 with --precision fp32)."""
        torch = self.torch
        n = 1024 if self.dry else 8192
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        c = torch.empty_like(a)
        reps = 2 if self.dry else 20
        for _ in range(3):
            torch.mm(a, b, out=c)
        self.sync()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            self.sync()
            ts.append((time.perf_counter() - t0) / reps)
        rate = 2 * n**3 / statistics.median(ts)
        self.mm_rates.append(rate)
        del a, b, c
        return rate

    def build(self, preset, batch, hr_px, s_px, ckpt):
        torch = self.torch
        from skysense.encoders import build_skysense
        from skysense.tasks.training.dist import DistInfo
        from skysense.tasks.training.meta_arch import MetaArch

        overrides = {
            "trainer.batch_size": batch,
            "trainer.device": str(self.device),
            "trainer.precision": self.precision,
            "trainer.compile": False,
            "trainer.grad_accum": 1,
            "model.checkpointing": ckpt,
        }
        cfg, source = pretrain_config(preset, overrides)
        self.config_source = source
        enc_over = _container(cfg.model.get("overrides") or {})
        enc_over.update(checkpointing=ckpt, hr_img_size=hr_px, s_img_size=s_px)
        torch.manual_seed(0)
        with self.device:  # parameters made where they live: huge has ~1.7 G of them
            encoder = build_skysense(preset, **enc_over)
        info = DistInfo(0, 1, 0, self.device)
        with self.device:  # the loss heads made where they live
            trainer = MetaArch(cfg, info, encoder)
        params = sum(p.numel() for p in trainer.student.parameters())
        return trainer, params, source

    def count(self, step_fn):
        """(model FLOPs, recomputed FLOPs) of one step: FLOPs inside checkpointed blocks'
        forward are the ones the backward computes again; they are counted apart."""
        from benchlib import MODEL_FLOP_BACKENDS, flop_counter
        from torch.utils.checkpoint import set_checkpoint_early_stop

        import skysense.encoders.checkpointing as ck
        from skysense.kernels import force_backend

        fc = flop_counter()
        inside = [0]
        original = ck.checkpoint

        def counting_checkpoint(fn, *args, **kw):
            before = fc.get_total_flops()
            out = original(fn, *args, **kw)
            inside[0] += fc.get_total_flops() - before
            return out

        ck.checkpoint = counting_checkpoint
        try:
            # Without early stop the backward recomputes each checkpointed forward whole, so
            # what ran inside them in the forward is exactly what runs again (with it, the
            # recompute stops after the last saved tensor and is a little smaller).
            # The kernels on torch backends that compute the math once: a Triton kernel is
            # invisible to the counter, and the fused losses recompute logits in the backward.
            with contextlib.ExitStack() as stack:
                for op, backend in MODEL_FLOP_BACKENDS.items():
                    stack.enter_context(force_backend(op, backend))
                stack.enter_context(set_checkpoint_early_stop(False))
                stack.enter_context(fc)
                step_fn()
        finally:
            ck.checkpoint = original
        self.sync()
        total = fc.get_total_flops()
        return total - inside[0], inside[0]

    def run(self, preset, batch, hr_px, s_px, t2, t1, ckpt) -> Row:
        torch = self.torch
        row = Row(preset, batch, hr_px, s_px, t2, t1, ckpt)
        held: dict = {}  # the trainer and batch, dropped whatever happens
        try:
            trainer, params, _ = self.build(preset, batch, hr_px, s_px, ckpt)
            held["trainer"] = trainer
            row.params_m = params / 1e6
            held["views"] = synthetic_views(batch, hr_px, s_px, t2, t1, self.device)
            counter = iter(range(10**9))

            def step():
                held["trainer"].step(held["views"], next(counter))

            model_flops, recompute = self.count(step)  # also the first warm-up
            for _ in range(self.warmup):
                step()
            self.sync()
            if not self.dry:
                torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(self.steps):
                t0 = time.perf_counter()
                step()
                self.sync()
                ts.append(time.perf_counter() - t0)
            row.step_s = statistics.median(ts)
            row.samples_per_s = batch / row.step_s
            row.model_tflop = model_flops / 1e12
            row.recompute_tflop = recompute / 1e12
            row.model_tflops = model_flops / row.step_s / 1e12
            if not self.dry:
                row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            row.status = "ok"
        except torch.OutOfMemoryError as e:
            row.status = "OOM"
            row.note = str(e).splitlines()[0][:120]
        except Exception as e:  # one table with everything that ran
            traceback.print_exc()
            row.status = "ERROR"
            row.note = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            trainer = None
            held.clear()
            gc.collect()
            if not self.dry:
                torch.cuda.empty_cache()
        self.rows.append(row)
        return row

    def table(self) -> str:
        mm = statistics.mean(self.mm_rates) if self.mm_rates else None
        head = (
            "| preset | params M | batch | HR px | S px | T2/T1 | act. ckpt | status | s/step | "
            "samples/s | model TFLOP/step | (recomputed) | model TFLOP/s | MFU | peak GiB | note |"
        )
        lines = [head, "|" + "---|" * 16]

        def f(v, fmt):
            return "" if v is None else format(v, fmt)

        for r in self.rows:
            mfu = r.model_tflops * 1e12 / mm if (mm and r.model_tflops) else None
            r.mfu = mfu
            lines.append(
                f"| {r.preset} | {f(r.params_m, '.0f')} | {r.batch} | {r.hr_px} | {r.s_px} | "
                f"{r.t2}/{r.t1} | {'on' if r.checkpointing else 'off'} | {r.status} | "
                f"{f(r.step_s, '.3f')} | {f(r.samples_per_s, '.2f')} | {f(r.model_tflop, '.3g')} | "
                f"{f(r.recompute_tflop, '.3g')} | {f(r.model_tflops, '.3g')} | {f(mfu, '.3f')} | "
                f"{f(r.peak_gib, '.1f')} | {r.note} |"
            )
        return "\n".join(lines)


def plans(preset: str, dry: bool) -> list[tuple[int, int, int, bool]]:
    """(batch, HR px, S px, checkpointing) to try in order; the first that fits ends the list."""
    from skysense.encoders import PRESETS

    p = PRESETS[preset]
    hr, s = p["hr_img_size"], p["s_img_size"]
    if dry:  # with checkpointing: the recompute accounting runs too
        return [(2, hr, s, True)]
    if preset == "huge":
        return [(1, hr, s, True), (1, hr // 2, s // 2, True)]
    return [(8, hr, s, False), (4, hr, s, False), (2, hr, s, False), (2, hr, s, True)]


def _header(dry: bool, bench: Bench) -> str:
    import torch

    dev = "CPU (dry run: tiny preset)" if dry else torch.cuda.get_device_name(0)
    mm = ", ".join(f"{r / 1e12:.3g}" for r in bench.mm_rates)
    return (
        f"# SkySense pre-training step on one GPU\n\ndevice: {dev}; torch {torch.__version__}; "
        f"python {platform.python_version()}; config {bench.config_source}\n\nOne step = MetaArch.step (teacher on both views, "
        "student + SkySenseLoss, backward, clip, AdamW, EMA, GCPL), precision "
        f"{bench.precision}, synthetic views of the batch contract. s/step: median of timed steps after warm-up. Model FLOPs: "
        "FlopCounterMode over one step, recomputation of checkpointed blocks left out (shown "
        f"apart). MFU: model FLOP/s over the torch.mm rate of this run ({bench.precision}: {mm} TFLOP/s, "
        "measured before and after the presets; the mean).\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, batch 2")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--presets", default="base,huge")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after warm-up)")
    p.add_argument("--t2", type=int, default=10, help="S2 steps per view")
    p.add_argument("--t1", type=int, default=5, help="S1 steps per view")
    p.add_argument(
        "--precision",
        default="bf16",
        choices=("bf16", "fp32"),
        help="trainer.precision (bf16: autocast, the GPU default; fp32 for a quick dry run)",
    )
    p.add_argument(
        "--without-omegaconf",
        action="store_true",
        help="test hook: hide Hydra and OmegaConf, as on the GPU image",
    )
    args = p.parse_args(argv)
    if args.without_omegaconf:
        for name in ("omegaconf", "hydra"):
            sys.modules[name] = None  # import raises ImportError
    _stand_in_omegaconf()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("check_pretrain: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    presets = ["tiny"] if args.dry_run else args.presets.split(",")
    bench = Bench(args.dry_run, args.steps)
    bench.precision = args.precision
    bench.matmul_rate()
    failures = 0
    for preset in presets:
        for batch, hr, s, ckpt in plans(preset, args.dry_run):
            t0 = time.perf_counter()
            row = bench.run(preset, batch, hr, s, args.t2, args.t1, ckpt)
            print(
                f"[{preset} B={batch} HR={hr} ckpt={ckpt}: {row.status} "
                f"{time.perf_counter() - t0:.1f}s]",
                file=sys.stderr,
                flush=True,
            )
            if row.status != "OOM":
                failures += row.status != "ok"
                break
        else:
            failures += 1  # every plan ran out of memory
    bench.matmul_rate()
    text = _header(args.dry_run, bench) + "\n" + bench.table() + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

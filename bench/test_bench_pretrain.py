"""Pre-training: the full SkySense pre-training step (``skysense.tasks.training.meta_arch.MetaArch``,
tiny preset, this CPU, fp32), its throughput and its share of this CPU's matmul rate, and how
its cost grows with the work.

One step is what ``skysense pretrain`` runs per batch: the teacher on both views, the student
and ``SkySenseLoss`` (MGCL + CMA), backward, gradient clipping, AdamW, the teacher EMA and the
GCPL prototype update. The config is ``skysense pretrain``'s own (Hydra compose of
``conf/pretrain.yaml``, model=tiny), the device the CPU, precision fp32; batches are views of
the embedded sample from ``skysense.data.build_loader`` (the pretrain config's view settings).

Figures:
- ``step samples/s`` (info): samples per second of whole steps.
- ``step model FLOP/s vs fp32 matmul`` (ratio = MFU): model FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention, forward and
  backward, with the kernels on backends that compute the math once:
  benchlib.count_model_flops) over the step's median time, against a square fp32
  ``torch.mm`` timed interleaved with the steps in the same run, at the same torch threads.
- scaling (step time, s): over the batch size; over the number of S2 time steps per view
  T2 = 1, 5, 10, 20; over the HR tile (views of 8, 16, 24 S2 px = HR 64, 128, 192 px).
  The embedded sample has 6-12 S2 dates per place, so the T2 series are built, not loaded:
  each view's S2 steps are its loaded valid steps cycled to T2 (pixels, day of year and pixel
  masks together), all valid, ``s2_index`` = 0..T2-1 in both views (every step matched across
  the views, as when both views keep a whole series). Repeated dates cost what distinct ones
  do: the encoder and the loss see shapes, not dates. S1 stays as loaded.

``SKYSENSE_BENCH_MODE=quick``: batch 2 for the MFU figure, two points per scaling series at
batch 1 (every figure kind present, small sizes).
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from benchlib import QUICK, compare, count_flops, count_model_flops, matmul

GROUP = "pretrain"
log = logging.getLogger(__name__)

BATCH = 2 if QUICK else 8  # the MFU figure (8: `skysense pretrain`'s default global batch)
ROUNDS = 3 if QUICK else 5  # interleaved step / matmul rounds of the MFU figure
MM_N = 1024 if QUICK else 2048
SWEEP_BATCH = (1, 2) if QUICK else (2, 4, 8, 16)
SWEEP_T2 = (1, 5) if QUICK else (1, 5, 10, 20)
SWEEP_CROP = (8, 16) if QUICK else (8, 16, 24)  # S2 px; HR = 8 x
SWEEP_AT = 1 if QUICK else 4  # batch of the T2 and HR sweeps
SWEEP_REPEAT = 1 if QUICK else 3


def compose_pretrain(batch: int):
    from skysense.tasks.cli import compose

    return compose(
        "pretrain",
        [
            "model=tiny",
            f"trainer.batch_size={batch}",
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "trainer.compile=false",
            "trainer.grad_accum=1",
        ],
    )


@pytest.fixture(scope="module")
def setup(embedded):
    from omegaconf import OmegaConf

    from skysense.tasks.pretrain import Run
    from skysense.tasks.training import dist as D
    from skysense.tasks.training.meta_arch import MetaArch

    cfg = compose_pretrain(BATCH)
    info = D.init("cpu")
    run = Run(cfg, info, embedded)
    torch.manual_seed(cfg.seed)
    encoder = run.build_encoder()
    trainer = MetaArch(cfg, info, encoder)
    views_cfg = OmegaConf.to_container(cfg.data.views, resolve=True)
    return trainer, views_cfg, embedded


def load_views(manifest, batch: int, views_cfg: dict, crop: int | None = None) -> dict:
    """One views batch of ``batch`` samples from the embedded sample (the loader's own)."""
    from skysense.data import build_loader

    vc = dict(views_cfg)
    if crop is not None:
        vc["crop"] = crop
    loader = build_loader(
        manifest, None, batch, backend="torch", views=True, view_config=vc, seed=0, epochs=None
    )
    return next(iter(loader))


def head(views: dict, b: int) -> dict:
    return {name: {k: t[:b] for k, t in v.items()} for name, v in views.items()}


def with_s2_steps(views: dict, steps: int) -> dict:
    """Each view's S2 series as ``steps`` steps cycled from its loaded valid ones (see the
    module docstring): contract shapes, all steps valid, ``s2_index`` = 0..steps-1."""
    out = {}
    for name, v in views.items():
        v = dict(v)
        b = v["s2_valid"].shape[0]
        picks = []
        for i in range(b):
            ok = v["s2_valid"][i].nonzero().flatten()
            if ok.numel() == 0:  # no usable step: cycle the padded ones (still contract shapes)
                ok = torch.arange(v["s2_valid"].shape[1])
            picks.append(ok[torch.arange(steps) % ok.numel()])
        idx = torch.stack(picks)  # (B, steps)
        rows = torch.arange(b)[:, None]
        for key in ("s2", "s2_doy", "s2_pixel_valid"):
            v[key] = v[key][rows, idx].contiguous()
        v["s2_valid"] = torch.ones(b, steps, dtype=torch.bool)
        v["s2_index"] = torch.arange(steps).expand(b, steps).contiguous()
        out[name] = v
    return out


def shape_params(views: dict) -> dict:
    v = views["view1"]
    return {
        "T2": int(v["s2"].shape[1]),
        "T1": int(v["s1"].shape[1]) if "s1" in v else 0,
        "hr_px": int(v["hr"].shape[-1]),
    }


class Stepper:
    """``trainer.step`` on a fixed batch, the step counter advancing (the schedules move)."""

    def __init__(self, trainer, views):
        self.trainer, self.views = trainer, views
        self.counter = itertools.count()

    def __call__(self):
        return self.trainer.step(self.views, next(self.counter))


def test_pretrain_step_throughput_and_mfu(report, setup):
    trainer, views_cfg, manifest = setup
    views = load_views(manifest, BATCH, views_cfg)
    step = Stepper(trainer, views)
    step()  # warm-up outside the counter: first calls build caches
    flops, by_op = count_model_flops(step)
    hw_flops, _ = count_flops(step)  # with the kernels the timed steps use
    mm, mm_flops = matmul(MM_N, reps=2 if QUICK else 1)
    t = compare({"step": step, "matmul": mm}, repeat=ROUNDS, warmup=1)
    shapes = shape_params(views)
    threads = torch.get_num_threads()
    model_rate = flops / t["step"]
    mm_rate = mm_flops / t["matmul"]
    params = {"preset": "tiny", "batch": BATCH, **shapes, "precision": "fp32"}
    report.add(
        GROUP,
        "step samples/s",
        BATCH / t["step"],
        "samples/s",
        kind="info",
        params={**params, "threads": threads},
        note=f"median of {ROUNDS} whole optimizer steps (teacher, student + SkySenseLoss, "
        "backward, clip, AdamW, EMA, GCPL) on one views batch of the embedded sample",
    )
    report.add(
        GROUP,
        "step FLOPs",
        flops / 1e9,
        "GFLOP",
        kind="info",
        params=params,
        note="model FLOPs: FlopCounterMode over one whole step with the kernels on torch "
        "backends that compute the math once (benchlib.MODEL_FLOP_BACKENDS): matmuls, "
        "convolutions, attention, forward and backward; elementwise, normalisation and optimizer "
        f"work count none. The timed kernels' own count ({hw_flops / 1e9:.3g} GFLOP) adds the "
        "fused losses' recompute of their logits in the backward. GFLOP by op: "
        + ", ".join(f"{k.removeprefix('aten.')} {v / 1e9:.3g}" for k, v in by_op.items()),
    )
    report.add(
        GROUP,
        "step model FLOP/s vs fp32 matmul (MFU)",
        model_rate / 1e9,
        "GFLOP/s",
        baseline=mm_rate / 1e9,
        baseline_name=f"fp32 torch.mm {MM_N}x{MM_N}, {threads} threads, same run",
        ratio=model_rate / mm_rate,
        params=params,
        note="MFU, a fraction of the matmul rate by definition (< 1 always): the step's model "
        "FLOPs over its time, against the square matmul's FLOP/s timed interleaved with it. "
        "Profiled here (batch 8, 1 thread): mm/addmm/bmm take ~57 % of a step and run at ~80 % "
        "of the square matmul's rate (the tiny preset's narrow shapes); the rest is work that "
        "counts no FLOPs: copies, GELU, softmax exponentials, norms, the loss's gathers, "
        "AdamW and the EMA",
        spread=t.spread("step", "matmul"),
    )
    print(
        f"\npretrain step tiny B={BATCH} {shapes}: {t['step']:.3f} s, {BATCH / t['step']:.2f} "
        f"samples/s, {flops / 1e9:.2f} GFLOP -> {model_rate / 1e9:.2f} GFLOP/s; matmul "
        f"{mm_rate / 1e9:.1f} GFLOP/s; MFU {model_rate / mm_rate:.3f}"
    )


def _scaling(report, name, trainer, views, sweep, value, note):
    t = compare({"step": Stepper(trainer, views)}, repeat=SWEEP_REPEAT, warmup=1)["step"]
    b = int(views["view1"]["hr"].shape[0])
    report.add(
        GROUP,
        name,
        t,
        "s",
        kind="scaling",
        params={"sweep": sweep, **shape_params(views), "batch": b, sweep: value},
        note=note,
    )
    return t


def test_pretrain_step_scaling_batch(report, setup):
    trainer, views_cfg, manifest = setup
    full = load_views(manifest, max(SWEEP_BATCH), views_cfg)
    for b in SWEEP_BATCH:
        _scaling(
            report,
            "step time vs batch",
            trainer,
            head(full, b),
            "batch",
            b,
            "the first b samples of one loaded views batch",
        )


def test_pretrain_step_scaling_s2_steps(report, setup):
    trainer, views_cfg, manifest = setup
    base = load_views(manifest, SWEEP_AT, views_cfg)
    for steps in SWEEP_T2:
        _scaling(
            report,
            "step time vs S2 steps",
            trainer,
            with_s2_steps(base, steps),
            "T2",
            steps,
            "S2 series cycled from the loaded valid steps to T2, all valid, matched across "
            "the views (the embedded sample has 6-12 dates)",
        )


def test_pretrain_step_scaling_hr_tile(report, setup):
    trainer, views_cfg, manifest = setup
    for crop in SWEEP_CROP:
        views = load_views(manifest, SWEEP_AT, views_cfg, crop=crop)
        _scaling(
            report,
            "step time vs HR tile",
            trainer,
            views,
            "hr_px",
            int(views["view1"]["hr"].shape[-1]),
            f"views of {crop} x {crop} S2 px (HR {crop * 8} px) of the 24 px tiles",
        )

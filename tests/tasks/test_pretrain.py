"""`skysense pretrain` on the embedded sample (issue 7): one MetaArch step checked part by part,
the scale modes (one process, DDP and FSDP on two gloo processes) against each other, a real
process killed with SIGKILL and resumed against an uninterrupted run, bad configs that stop
before any work, a NaN loss that stops the run, and checkpoints that load with
``weights_only=True``.

Everything runs the tiny preset with small heads, 4 time steps per series and 4-sample batches,
one torch thread per process (the CPU is shared). The runs are module fixtures that several
tests read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skysense.tasks import cli
from skysense.tasks.pretrain import Run, main, prepare_data
from skysense.tasks.training import checkpoint as ckpt
from skysense.tasks.training import dist as D
from skysense.tasks.training.meta_arch import MetaArch

FAMILIES = ("hr", "s2", "s1", "fused")
LEVELS = ("pixel", "object", "image")
EXPECTED_TERMS = {f"mgcl/{f}/{lvl}" for f in FAMILIES for lvl in LEVELS} | {
    "cma/hr-s2",
    "cma/hr-s1",
    "cma/s2-s1",
    "mgcl",
    "cma",
    "total",
}

N_SAMPLES = 12
TINY = [
    "loss.n_prototypes=256",
    "loss.head_hidden_dim=128",
    "loss.head_bottleneck_dim=64",
    f"data.n_samples={N_SAMPLES}",
    "data.backend=torch",
    "data.views.max_steps.s2=4",
    "data.views.max_steps.s1=4",
    "trainer.batch_size=4",
    "trainer.linear_probe=false",
]
# Steps that draw no random numbers (all pixel pairs, no stochastic depth), so that one process
# and two can be compared value for value.
DETERMINISTIC = ["loss.max_pixel_pairs=null", "++model.overrides.fusion_drop_path_rate=0.0"]
# Steps that do draw random numbers (a binding pixel-pair cap, stochastic depth in the fusion),
# so that a resume must restore the random state to match.
RANDOM = ["loss.max_pixel_pairs=8", "++model.overrides.fusion_drop_path_rate=0.2"]

# One process and two (DDP, FSDP) on the same global batch: MGCL scales each process's level
# means by n_local * world / n_global, so the average over processes is the global-batch mean
# even though the processes hold different numbers of rows (pixel pairs inside the other view,
# matched S2/S1 steps). Measured here: losses and terms within 2.2e-7 relative, weights within
# 4.4e-7 after three steps; the bound leaves a margin for float32 summation order.
SCALE_REL = 2e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The embedded sample (12 places), made once for the module."""
    from skysense.data.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("embedded")
    ensure_embedded(root, n_samples=N_SAMPLES, seed=0)
    return root


def overrides(data_root, run_dir, *extra) -> list[str]:
    return [*TINY, f"data.root={data_root}", f"run_dir={run_dir}", *extra]


def compose(data_root, run_dir, *extra):
    return cli.compose("pretrain", overrides(data_root, run_dir, *extra))


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(args) -> list[str]:
    return [sys.executable, "-m", "skysense.tasks.cli", "pretrain", *args]


def run_in_process(cfg) -> dict:
    """`skysense pretrain` in this process; returns the final checkpoint."""
    assert main(cfg) == 0
    return ckpt.load(ckpt.latest(Path(cfg.run_dir) / "checkpoints"))


def build_trainer(cfg) -> tuple[MetaArch, Run]:
    """A single-process MetaArch on ``cfg`` (seeded as the loop seeds it), and its Run."""
    info = D.init("cpu")
    run = Run(cfg, info, prepare_data(cfg, info))
    torch.manual_seed(cfg.seed)
    encoder = run.build_encoder()
    trainer = MetaArch(cfg, info, encoder)
    trainer.distribute()
    return trainer, run


def close(a, b, rel=1e-5, abs_=1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(
        (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a
    )


# --- one step, part by part ---------------------------------------------------------------


@pytest.mark.slow
def test_two_steps_train_every_part(data_root, tmp_path):
    """Two optimizer steps with every loss term on: every term present and finite, the student
    trained, the teacher exactly the EMA of the student, the GCPL prototypes moved and shared."""
    cfg = compose(data_root, tmp_path)
    info = D.init("cpu")
    run = Run(cfg, info, prepare_data(cfg, info))
    encoder = run.build_encoder()
    trainer = MetaArch(cfg, info, encoder)
    trainer.distribute()
    student, teacher = trainer.student, trainer.teacher

    def params(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def ema_view(module_params, prefix_map):
        return {prefix_map(n): p for n, p in module_params.items() if prefix_map(n)}

    def student_as_teacher(n):  # the student's names of the teacher's parameters
        if n.startswith("encoder."):
            return n
        if n.startswith("loss.heads."):
            return "heads." + n[len("loss.heads.") :]
        return None

    s0, t0 = params(student), params(teacher)
    protos0 = student.encoder.geo_context.prototypes.clone()
    expected_t = dict(t0)
    it = iter(run.build_loader(0, cfg.trainer.batch_size))
    for step in range(2):
        rec = trainer.step(next(it), step)
        assert set(rec["terms"]) >= EXPECTED_TERMS, sorted(EXPECTED_TERMS - set(rec["terms"]))
        assert all(math.isfinite(v) for v in rec["terms"].values()), rec["terms"]
        assert close(rec["loss"], rec["terms"]["total"])
        assert math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
        m = rec["momentum"]
        s_now = ema_view(params(student), student_as_teacher)
        expected_t = {n: m * expected_t[n] + (1 - m) * s_now[n] for n in expected_t}

    s2, t2 = params(student), params(teacher)
    unchanged = [n for n, p in s2.items() if torch.equal(p, s0[n])]
    # Only the norms of Swin stages 1-3, which feed the downstream pyramids (pre-training
    # reads stage 4), get no gradient (and, being norms, no weight decay).
    assert all(".hr_encoder.out_norms." in n for n in unchanged), unchanged
    assert not any(".out_norms.3." in n for n in unchanged), unchanged
    assert t2.keys() == expected_t.keys()
    assert max_diff(t2, expected_t) < 1e-6, "the teacher is not the EMA of the student"
    assert max_diff(t2, t0) > 0
    assert max_diff(t2, ema_view(s2, student_as_teacher)) > 0
    assert not teacher.training and not any(m.training for m in teacher.modules())

    protos = student.encoder.geo_context.prototypes
    assert not torch.equal(protos, protos0), "GCPL did not move the prototypes"
    assert torch.equal(protos, teacher.encoder.geo_context.prototypes)
    assert student.loss.centering.center.abs().sum() > 0, "the teacher centres did not move"
    opt_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert opt_steps == {2}


@pytest.mark.slow
def test_grad_accum_gives_the_one_batch_step(data_root, tmp_path):
    """trainer.grad_accum=2 on a batch is grad_accum=1 on it, over two steps: the same loss and
    MGCL terms, gradient norm, weights, teacher centres (updated once per step) and GCPL
    prototypes. CMA is weighted 0 here: its InfoNCE takes its negatives from the micro-batch
    (not decomposable), so its terms differ by construction."""
    runs = {}
    for accum in (1, 2):
        cfg = compose(
            data_root, tmp_path / f"accum{accum}", *DETERMINISTIC, "loss.cma=0.0",
            f"trainer.grad_accum={accum}",
        )  # fmt: skip
        trainer, run = build_trainer(cfg)
        it = iter(run.build_loader(0, cfg.trainer.batch_size))
        recs = [trainer.step(next(it), step) for step in range(2)]
        runs[accum] = (recs, trainer)
    (one, t1), (two, t2) = runs[1], runs[2]
    for r1, r2 in zip(one, two):
        assert close(r2["loss"], r1["loss"]), (r2["loss"], r1["loss"])
        mgcl = {k for k in r1["terms"] if k.startswith("mgcl")} | {"total"}
        assert len(mgcl) == 14 and set(r2["terms"]) == set(r1["terms"])
        bad = {k: (r2["terms"][k], r1["terms"][k]) for k in mgcl}
        assert not {k: v for k, v in bad.items() if not close(*v)}, bad
        assert close(r2["grad_norm"], r1["grad_norm"]), (r2["grad_norm"], r1["grad_norm"])

    def state(trainer):
        s = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
        s.update({f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()})
        return {k: v for k, v in s.items() if v.is_floating_point()}

    s1, s2 = state(t1), state(t2)
    assert max_diff(s2, s1) < 2e-6  # measured 4.4e-7
    assert s1["student.loss.centering.center"].abs().sum() > 0  # the centres moved
    for key in ("student.loss.centering.center", "student.encoder.geo_context.prototypes"):
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-5, atol=1e-6)
    # The teacher-temperature warm-up advances once per optimizer step, not per micro-batch.
    temps = [[r["teacher_temp"] for r in recs] for recs in (one, two)]
    assert temps[0] == temps[1] and temps[0][0] < temps[0][1], temps


@pytest.mark.slow
def test_bf16_autocast_step(data_root, tmp_path):
    """trainer.precision=bf16 (the CUDA default, here on the CPU), with gradient accumulation:
    a whole step runs (the object clustering used to crash under bf16 autocast), every term
    finite and close to the float32 step's."""
    recs = {}
    for precision in ("bf16", "fp32"):
        cfg = compose(
            data_root, tmp_path / precision, *DETERMINISTIC, f"trainer.precision={precision}",
            "trainer.grad_accum=2",
        )  # fmt: skip
        trainer, run = build_trainer(cfg)
        recs[precision] = trainer.step(next(iter(run.build_loader(0, 4))), 0)
    bf16, fp32 = recs["bf16"], recs["fp32"]
    assert set(bf16["terms"]) >= EXPECTED_TERMS
    assert all(math.isfinite(v) for v in bf16["terms"].values()), bf16["terms"]
    assert math.isfinite(bf16["grad_norm"]) and bf16["grad_norm"] > 0
    bad = {k: (v, fp32["terms"][k]) for k, v in bf16["terms"].items()}
    assert not {k: v for k, v in bad.items() if not close(*v, rel=1e-2)}, bad


@pytest.mark.slow
def test_ranks_share_out_the_global_batch(data_root, tmp_path):
    """Two processes' batches, concatenated in rank order, are the one-process batch: the same
    samples, views and steps."""
    cfg = compose(data_root, tmp_path)
    manifest = prepare_data(cfg, D.init("cpu"))
    cpu = torch.device("cpu")

    def batches(rank, world, start=0, n=3):
        loader = Run(cfg, D.DistInfo(rank, world, rank, cpu), manifest).build_loader(
            start, cfg.trainer.batch_size // world
        )
        it = iter(loader)
        return [next(it) for _ in range(n)]

    one, r0, r1 = batches(0, 1), batches(0, 2), batches(1, 2)
    for g, (b, b0, b1) in enumerate(zip(one, r0, r1)):
        for view in ("view1", "view2"):
            v, v0, v1 = b[view], b0[view], b1[view]
            for key in ("sample_id", "view_affine", "hr", "latlon"):
                assert torch.equal(torch.cat([v0[key], v1[key]]), v[key]), (g, view, key)
            for m in ("s2", "s1"):
                idx = v[f"{m}_index"]
                parts = [(x, x[f"{m}_index"]) for x in (v0, v1)]
                i = 0
                for x, xi in parts:
                    for j in range(xi.shape[0]):
                        keep = xi[j] >= 0
                        assert torch.equal(xi[j][keep], idx[i][idx[i] >= 0])
                        assert torch.equal(x[m][j][keep], v[m][i][idx[i] >= 0])
                        i += 1
    # A resumed loader starts at the global batch it is told.
    assert torch.equal(batches(0, 1, start=2, n=1)[0]["view1"]["hr"], one[2]["view1"]["hr"])


# --- scale modes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scale_runs(data_root, tmp_path_factory):
    """Three steps of the same seed and global batch: one process (in this process), and
    `skysense pretrain trainer.nproc=2` with DDP and with FSDP (torchrun, gloo), run at once."""
    root = tmp_path_factory.mktemp("scale")
    common = [*DETERMINISTIC, "trainer.max_steps=3", "trainer.checkpoint_every=3"]
    procs = {}
    for mode in ("ddp", "fsdp"):
        args = overrides(data_root, root / mode, *common, "trainer.nproc=2")
        args.append(f"trainer.strategy={mode}")
        procs[mode] = subprocess.Popen(
            command(args),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    runs = {"single": run_in_process(compose(data_root, root / "single", *common))}
    for mode, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{mode} run failed:\n{out[-6000:]}"
        runs[mode] = ckpt.load(ckpt.latest(root / mode / "checkpoints"))
        runs[mode]["summary"] = json.loads((root / mode / "summary.json").read_text())
        runs[mode]["output"] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_train(scale_runs, mode):
    """`skysense pretrain trainer.nproc=2` launches torchrun itself and trains on two gloo
    processes; on the first step (same weights everywhere) every term equals the one-process
    value on the same global batch."""
    run, single = scale_runs[mode], scale_runs["single"]
    assert run["summary"]["world_size"] == 2 and run["summary"]["steps"] == 3
    assert "launching 2 processes" in run["output"]
    assert [h["step"] for h in run["history"]] == [1, 2, 3]
    assert run["loss_terms"] == single["loss_terms"]
    for h in run["history"]:
        assert set(h["terms"]) >= EXPECTED_TERMS and math.isfinite(h["loss"])
    first, ref = run["history"][0]["terms"], single["history"][0]["terms"]
    assert first.keys() == ref.keys()
    bad = {k: (first[k], ref[k]) for k in ref if not close(first[k], ref[k], rel=SCALE_REL)}
    assert not bad, f"{mode} differs from one process on the first step: {bad}"


@pytest.mark.slow
def test_fsdp_computes_what_ddp_computes(scale_runs):
    """Sharding changes nothing: FSDP's losses, terms and weights are DDP's."""
    ddp, fsdp = scale_runs["ddp"], scale_runs["fsdp"]
    for a, b in zip(ddp["history"], fsdp["history"]):
        assert close(a["loss"], b["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["terms"].keys() == b["terms"].keys()
        assert all(close(a["terms"][k], b["terms"][k]) for k in a["terms"]), a["step"]
    for key in ("student_module", "teacher_module"):
        assert max_diff(ddp[key], fsdp[key]) < 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_scale_mode_gives_the_one_process_loss(scale_runs, mode):
    """Every step's loss and terms, and the final weights, equal one process's on the same
    global batch (see SCALE_REL)."""
    run, single = scale_runs[mode], scale_runs["single"]
    assert len(run["history"]) == len(single["history"]) == 3
    for h, r in zip(run["history"], single["history"]):
        assert close(h["loss"], r["loss"], rel=SCALE_REL), (h["step"], h["loss"], r["loss"])
        assert h["terms"].keys() == r["terms"].keys()
        bad = {k: (h["terms"][k], r["terms"][k]) for k in r["terms"]}
        bad = {k: v for k, v in bad.items() if not close(*v, rel=SCALE_REL)}
        assert not bad, (h["step"], bad)
    for key in ("student_module", "teacher_module"):
        assert max_diff(run[key], single[key]) < SCALE_REL, key


# --- kill and resume ------------------------------------------------------------------


RESUME = [*RANDOM, "trainer.max_steps=6", "trainer.checkpoint_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """Six steps without interruption (in this process)."""
    return run_in_process(compose(data_root, tmp_path_factory.mktemp("whole"), *RESUME))


@pytest.mark.slow
def test_killed_and_resumed_run_ends_as_an_uninterrupted_one(data_root, tmp_path, uninterrupted):
    """A real `skysense pretrain` killed with SIGKILL after its first checkpoint, then run again
    with resume=true, ends with the uninterrupted run's history, weights, prototypes, centres
    and optimizer state."""
    args = overrides(data_root, tmp_path, *RESUME)
    pointer = tmp_path / "checkpoints" / ckpt.LATEST
    p = subprocess.Popen(
        command(args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not pointer.exists():
            assert p.poll() is None, (
                f"the run ended before a checkpoint:\n{p.stderr.read()[-4000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    killed_at = ckpt.load(ckpt.latest(tmp_path / "checkpoints"))["step"]
    assert 2 <= killed_at < 6 and not (tmp_path / "summary.json").exists()

    r = subprocess.run(
        command([*args, "resume=true"]), env=env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-6000:]
    resumed = tmp_path / "checkpoints" / f"step_{killed_at:07d}.pt"
    assert f"resumed from {resumed} at step {killed_at}" in r.stderr, r.stderr[-3000:]
    assert f"6 steps ({6 - killed_at} this run)" in r.stdout
    final, ref = ckpt.load(ckpt.latest(tmp_path / "checkpoints")), uninterrupted

    assert (final["step"], final["data_position"]) == (ref["step"], ref["data_position"]) == (6, 6)
    assert [h["step"] for h in final["history"]] == list(range(1, 7))
    for h, r_ in zip(final["history"], ref["history"]):
        assert close(h["loss"], r_["loss"]), (h["step"], h["loss"], r_["loss"])
        assert h["lr"] == r_["lr"]
        assert all(close(h["terms"][k], r_["terms"][k]) for k in r_["terms"]), h["step"]
    for key in ("student_module", "teacher_module"):
        assert max_diff(final[key], ref[key]) < 1e-5, key
    for key in ("encoder.geo_context.prototypes", "loss.centering.center"):
        assert torch.allclose(final["student_module"][key], ref["student_module"][key], atol=1e-6)
    fo, ro = final["optimizer"], ref["optimizer"]
    assert fo["state"].keys() == ro["state"].keys()
    for name, st in ro["state"].items():
        assert float(fo["state"][name]["step"]) == float(st["step"]) == 6.0
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fo["state"][name][k], st[k], rtol=1e-4, atol=1e-7), (name, k)
    assert [g["lr"] for g in fo["param_groups"]] == [g["lr"] for g in ro["param_groups"]]


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only(uninterrupted, data_root, tmp_path):
    """Downstream users load pre-training checkpoints with torch.load(weights_only=True): the
    RNG states are tensors and plain values, and the encoder weights load strictly."""
    from skysense.encoders import build_skysense

    cfg = compose(data_root, tmp_path, *RESUME)
    path = ckpt.latest(Path(uninterrupted["config"]["run_dir"]) / "checkpoints")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 6 and state["loss_terms"]
    encoder = build_skysense("tiny", **dict(cfg.model.overrides))
    encoder.load_state_dict(state["student"])
    encoder.load_state_dict(state["teacher"])

    rng = state["rng"][0]
    ckpt.set_rng_state(rng)
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert np.array_equal(np.random.get_state()[1], rng["numpy"]["keys"].numpy())  # noqa: NPY002
    again = ckpt.rng_state()
    assert torch.equal(again["python"]["state"], rng["python"]["state"])


# --- failures -----------------------------------------------------------------------------


@pytest.fixture
def keep_log_handlers():
    """cli.main installs a stderr handler on the root logger (here: pytest's capture)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


BAD_CONFIGS = [  # (overrides, the field the message starts with)
    (["model.preset=giant"], "model.preset"),
    (["trainer.batch_size=3", "trainer.nproc=2"], "trainer.batch_size"),
    (["trainer.batch_size=4", "trainer.grad_accum=3"], "trainer.batch_size"),
    (["data=shards", "data.manifest=/nonexistent/manifest.sqlite"], "data.manifest"),
    (["data=shards"], "data.manifest"),
    (["data=oscd"], "data"),  # a downstream dataset: pre-training reads a manifest
    (["optim.lr_scaling=lienar"], "optim.lr_scaling"),
    (["trainer.strategy=zero3"], "trainer.strategy"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["data.backend=jax"], "data.backend"),
    (["data.views.crop=0"], "data.views"),
    (["+loss.temperature=0.1"], "loss.temperature"),
]
if not torch.cuda.is_available():
    BAD_CONFIGS.append((["trainer.device=cuda"], "trainer.device"))


@pytest.mark.unit
@pytest.mark.parametrize(("args", "field"), BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_fails_before_any_work(args, field, tmp_path, capsys, keep_log_handlers):
    """Exit status 2 and a one-line message naming the field; no data made, no run folder, no
    processes launched."""
    argv = ["pretrain", f"run_dir={tmp_path / 'run'}", *args]
    if not any(a.startswith("data=") for a in args):  # the shards group has no root
        argv.append(f"data.root={tmp_path / 'data'}")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"skysense pretrain: {field}: " in err, err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    assert "Traceback" not in err and "launching" not in err


@pytest.mark.unit
def test_teacher_warmup_longer_than_the_run_is_warned(caplog):
    """A teacher-temperature warm-up past the last step is named (it kept the real-data run's
    teacher cold and its prototypes collapsed); one inside the run is not."""
    from skysense.tasks.pretrain import validate

    with caplog.at_level(logging.WARNING, logger="skysense.tasks.pretrain"):
        validate(cli.compose("pretrain", ["trainer.max_steps=100"]))
        assert "warmup_teacher_temp_steps 37500 outlasts the run" in caplog.text
        caplog.clear()
        validate(cli.compose("pretrain", ["trainer.max_steps=100",
                                          "loss.warmup_teacher_temp_steps=30"]))  # fmt: skip
        assert "outlasts" not in caplog.text


@pytest.mark.unit
def test_unknown_preset_group_fails_before_any_work(tmp_path, capsys, keep_log_handlers):
    assert cli.main(["pretrain", f"run_dir={tmp_path / 'run'}", "model=giant"]) == 2
    err = capsys.readouterr().err
    assert "model/giant" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(
    data_root, tmp_path, monkeypatch, capsys
):
    """A term that goes NaN at step 2 stops the run (exit status 1) with a message naming the
    step and the term; the step-1 checkpoint stays the latest, complete one."""
    from skysense.losses import SkySenseLoss

    forward = SkySenseLoss.forward

    calls = []

    def nan_at_step_2(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # one call per step (grad_accum 1): step 2
            out.terms["mgcl/s2/pixel"] = torch.tensor(float("nan"))
            out.total = out.total + float("nan")
        return out

    monkeypatch.setattr(SkySenseLoss, "forward", nan_at_step_2)
    cfg = compose(data_root, tmp_path, "trainer.max_steps=3", "trainer.checkpoint_every=1")
    assert main(cfg) == 1
    err = capsys.readouterr().err
    assert "step 2" in err and "mgcl/s2/pixel" in err, err
    latest = ckpt.latest(tmp_path / "checkpoints")
    assert latest.name == "step_0000001.pt"
    state = ckpt.load(latest)
    assert state["step"] == 1 and len(state["history"]) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_0000001.pt",
        "step_0000001.pt.sha256",
    ]
    assert not (tmp_path / "summary.json").exists()

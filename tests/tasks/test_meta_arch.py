"""The meta-architecture's loss protocol on synthetic features: gradient accumulation
(``StepAccumulator``: micro-batches of one batch give that batch's MGCL terms, gradients and one
centre update), the MGCL row counts it normalises by, the teacher-temperature schedule, the
``loss`` config group and the loss built for an encoder."""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml

from skysense.losses import SkySenseLoss
from skysense.tasks.training.meta_arch import (
    TEACHER_SCHEDULE_FIELDS,
    StepAccumulator,
    build_loss,
    loss_config_fields,
    teacher_temperature,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))
from losses_synth import make_batch  # noqa: E402  (the losses tests' synthetic features)

pytestmark = pytest.mark.unit

KW = dict(n_prototypes=41, head_hidden_dim=24, head_bottleneck_dim=16, n_clusters=3)
B = 4
CONF = Path(__file__).resolve().parents[2] / "packages/tasks/src/skysense/tasks/conf/loss"


def take(d, sl):
    return {k: v[sl] for k, v in d.items()}


def leaves(outs):
    return [
        {
            k: (v.clone().requires_grad_(True) if k.startswith("tokens_") or k == "fused" else v)
            for k, v in o.items()
        }
        for o in outs
    ]


def setup(seed=31, **kw):
    students, teachers, views = make_batch(b=B, seed=seed, requires_grad=False)
    torch.manual_seed(0)
    loss = SkySenseLoss(12, 10, cma=0.0, **KW, **kw).train()
    with torch.no_grad():
        loss.centering.center.normal_()
        t_heads = copy.deepcopy(loss.heads)
        for p in t_heads.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std().clamp_min(1e-3))
    return loss, t_heads, students, teachers, views


def run(loss, t_heads, students, teachers, views, cuts, accumulate=True):
    """One optimizer step's forward/backward over the micro-batches ``cuts`` (slices of the
    batch), as ``MetaArch.step`` runs them (``accumulate``) or as independent steps (not):
    terms averaged over them (as the trainer logs), gradients, centres."""
    s = leaves(students)
    parts = [
        ([take(o, c) for o in s], [take(o, c) for o in teachers], [take(v, c) for v in views])
        for c in cuts
    ]
    terms = {}
    groups = [parts] if accumulate else [[p] for p in parts]
    for group in groups:
        acc = StepAccumulator(loss, [p[1] for p in group], [p[2] for p in group])
        for ps, pt, pv in group:
            out = loss(ps, pt, pv, t_heads, teacher_temp=0.05, row_norm=acc.row_norm)
            acc.add(out)
            (out.total / len(cuts)).backward()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v / len(cuts)
        acc.finish(t_heads)
    grads = {f"heads.{n}": p.grad for n, p in loss.heads.named_parameters()}
    grads.update(
        {f"{i}/{k}": v.grad for i, o in enumerate(s) for k, v in o.items() if v.grad is not None}
    )
    return terms, grads, loss.centering.center.clone()


@pytest.mark.parametrize(
    "cuts", [[slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 3), slice(3, 4)]]
)
def test_micro_batches_give_the_whole_batch(cuts):
    loss, t_heads, students, teachers, views = setup()
    loss_a = copy.deepcopy(loss)
    whole_terms, whole_grads, whole_centres = run(
        loss, t_heads, students, teachers, views, [slice(0, B)], accumulate=False
    )
    terms, grads, centres = run(loss_a, t_heads, students, teachers, views, cuts)
    mgcl = [k for k in whole_terms if k.startswith("mgcl")]
    assert len(mgcl) == 13
    for k in [*mgcl, "total"]:
        torch.testing.assert_close(terms[k], whole_terms[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads.keys() == whole_grads.keys()
    for k, g in whole_grads.items():
        atol = 1e-5 * float(g.abs().max()) + 1e-9
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=atol, msg=k)
    # One centre update, from the whole batch's statistics.
    torch.testing.assert_close(centres, whole_centres, rtol=1e-5, atol=1e-6)


def test_plain_micro_batches_do_not():
    """Micro-batches run as steps of their own average per-micro-batch means and update the
    centres once per call: what the accumulation fixes (the test above has teeth)."""
    loss, t_heads, students, teachers, views = setup()
    loss_a = copy.deepcopy(loss)
    whole, _, whole_centres = run(
        loss, t_heads, students, teachers, views, [slice(0, B)], accumulate=False
    )
    cuts = [slice(0, 2), slice(2, 4)]
    plain, _, centres = run(loss_a, t_heads, students, teachers, views, cuts, accumulate=False)
    assert not torch.allclose(plain["mgcl/s2/pixel"], whole["mgcl/s2/pixel"], rtol=1e-3)
    assert not torch.allclose(centres, whole_centres, rtol=1e-3)


@pytest.mark.parametrize("cap", [None, 2, 5])
def test_row_counts_are_the_forward_rows(cap):
    """``mgcl_row_counts`` (teacher outputs alone, no random draw) counts the rows the forward
    averages over, with or without the pixel-pair cap."""
    loss, t_heads, students, teachers, views = setup(seed=32, max_pixel_pairs=cap)
    counts = loss.mgcl_row_counts(teachers, views)
    out = loss.eval()(students, teachers, views, t_heads)
    assert {f"mgcl/{k}": n for k, n in counts.items() if n} == out.rows
    assert counts["s2/pixel"] > 0 and counts["s2/object"] % KW["n_clusters"] == 0


def test_an_abandoned_step_applies_nothing_and_a_mismatch_is_named():
    loss, t_heads, students, teachers, views = setup(seed=33)
    before = loss.centering.center.clone()
    acc = StepAccumulator(loss, [teachers, teachers], [views, views])
    acc.add(loss(students, teachers, views, t_heads, row_norm=acc.row_norm))
    assert torch.equal(loss.centering.center, before)  # nothing moves before finish
    # Teacher outputs of other micro-batches than those run: named at the end of the step.
    half = [take(o, slice(0, 2)) for o in teachers]
    half_views = [take(v, slice(0, 2)) for v in views]
    acc = StepAccumulator(loss, [half, half], [half_views, half_views])
    acc.add(loss(students, teachers, views, t_heads, row_norm=acc.row_norm))
    with pytest.raises(RuntimeError, match="teacher outputs given hold"):
        acc.finish(t_heads)
    with pytest.raises(ValueError, match="needs the same number"):
        StepAccumulator(loss, [teachers], [views, views])


def test_centres_move_in_training_mode_only():
    loss, t_heads, students, teachers, views = setup(seed=34)
    before = loss.centering.center.clone()
    for mode, moved in ((False, False), (True, True)):
        loss.train(mode)
        acc = StepAccumulator(loss, [teachers], [views])
        assert acc.row_norm is None  # a lone call of one process: its own means
        acc.add(loss(students, teachers, views, t_heads))
        acc.finish(t_heads)
        assert (not torch.equal(loss.centering.center, before)) == moved


def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.07, 0.04, 100) == pytest.approx(0.04)
    assert teacher_temperature(50, 0.07, 0.04, 100) == pytest.approx(0.055)
    assert teacher_temperature(100, 0.07, 0.04, 100) == pytest.approx(0.07)
    assert teacher_temperature(10**6, 0.07, 0.04, 100) == pytest.approx(0.07)
    assert teacher_temperature(None, 0.07, 0.04, 100) == pytest.approx(0.07)
    assert teacher_temperature(3, 0.07, 0.04, 0) == pytest.approx(0.07)


def test_config_group_lists_every_field():
    """conf/loss/default.yaml holds every keyword argument of SkySenseLoss and the teacher
    schedule's fields, each commented; build_loss splits them."""
    cfg = yaml.safe_load((CONF / "default.yaml").read_text())
    params = inspect.signature(SkySenseLoss.__init__).parameters
    fields = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(cfg) == fields | set(TEACHER_SCHEDULE_FIELDS) == loss_config_fields()
    # The head sizes follow the model preset (model.heads).
    assert cfg["n_prototypes"] == "${model.heads.n_prototypes}" and "mgcl" in cfg and "cma" in cfg
    text = (CONF / "default.yaml").read_text()
    for f in set(cfg):  # each field is commented (a comment line somewhere above it)
        assert f"\n{f}:" in text
    sizes = {"n_prototypes": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8}
    loss = SkySenseLoss.from_config({k: cfg[k] for k in fields} | sizes, 12, 10)
    assert loss.heads["s2"].n_prototypes == 32 and loss.heads["fused"].in_dim == 10
    with pytest.raises(ValueError, match="unknown field.*'mgcl_weight'"):
        SkySenseLoss.from_config({"mgcl_weight": 1.0}, 12, 10)


def test_build_loss_reads_the_encoders_dims_and_the_schedule():
    class Cfg:
        grid_dim, fusion_dim = 12, 10

    class Enc(torch.nn.Module):
        cfg = Cfg()

    loss, schedule = build_loss(
        {"n_prototypes": 16, "head_hidden_dim": 8, "warmup_teacher_temp_steps": 5}, Enc()
    )
    assert loss.heads["hr"].in_dim == 12 and loss.heads["fused"].in_dim == 10
    assert schedule == {"warmup_teacher_temp": 0.04, "warmup_teacher_temp_steps": 5}
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        build_loss({"bogus": 1}, Enc())

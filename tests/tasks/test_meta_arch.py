"""Gradient accumulation (``SkySenseLoss.accumulation``) and the MGCL row counts it normalises by:
micro-batches of one batch give that batch's MGCL terms, gradients and one centre update."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from losses_synth import make_batch

from skysense.losses import SkySenseLoss

pytestmark = pytest.mark.unit

KW = dict(n_prototypes=41, head_hidden_dim=24, head_bottleneck_dim=16, n_clusters=3)
B = 4


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
    batch): terms averaged over them (as the trainer logs), gradients, centres."""
    s = leaves(students)
    parts = [
        ([take(o, c) for o in s], [take(o, c) for o in teachers], [take(v, c) for v in views])
        for c in cuts
    ]
    terms = {}
    ctx = (
        loss.accumulation([p[1] for p in parts], [p[2] for p in parts])
        if accumulate
        else contextlib.nullcontext()
    )
    with ctx:
        for ps, pt, pv in parts:
            out = loss(ps, pt, pv, t_heads, step=3)
            (out.total / len(cuts)).backward()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v / len(cuts)
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
    assert int(loss_a.calls) == int(loss.calls) == 1


def test_plain_micro_batches_do_not():
    """Without ``accumulation`` the micro-batches average per-micro-batch means and update the
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
    assert int(loss_a.calls) == 2


@pytest.mark.parametrize("cap", [None, 2, 5])
def test_row_counts_are_the_forward_rows(cap):
    """``mgcl_row_counts`` (teacher outputs alone, no random draw) counts the rows the forward
    averages over, with or without the pixel-pair cap."""
    loss, t_heads, students, teachers, views = setup(seed=32, max_pixel_pairs=cap)
    counts = loss.mgcl_row_counts(teachers, views)
    out = loss.eval()(students, teachers, views, t_heads)
    assert {f"mgcl/{k}": n for k, n in counts.items() if n} == out.rows
    assert counts["s2/pixel"] > 0 and counts["s2/object"] % KW["n_clusters"] == 0


def test_an_exception_applies_nothing_and_a_mismatch_is_named():
    loss, t_heads, students, teachers, views = setup(seed=33)
    before = loss.centering.center.clone()
    with pytest.raises(ZeroDivisionError), loss.accumulation([teachers], [views]):
        loss(students, teachers, views, t_heads)
        raise ZeroDivisionError
    assert torch.equal(loss.centering.center, before) and int(loss.calls) == 0
    # Usable again, and a plain call after it updates the centres at once.
    loss(students, teachers, views, t_heads)
    assert not torch.equal(loss.centering.center, before) and int(loss.calls) == 1
    # Teacher outputs of other micro-batches than those run: named on leaving.
    half = [take(o, slice(0, 2)) for o in teachers]
    half_views = [take(v, slice(0, 2)) for v in views]
    with (
        pytest.raises(RuntimeError, match="teacher outputs given on entering"),
        loss.accumulation([half], [half_views]),
    ):
        loss(students, teachers, views, t_heads)
    with (
        pytest.raises(RuntimeError, match="already accumulating"),
        loss.accumulation([teachers], [views]),
        loss.accumulation([teachers], [views]),
    ):
        pass

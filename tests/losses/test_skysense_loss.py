"""SkySenseLoss: how the terms combine, and the invariances that catch real bugs (view swap,
padded steps, absent modality, entropy floor); the centres' statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from losses_synth import make_batch

from skysense.losses import SkySenseLoss

pytestmark = pytest.mark.unit

KW = dict(n_prototypes=41, head_hidden_dim=24, head_bottleneck_dim=16, n_clusters=3)


def grads(tensors):
    return [t.grad.clone() for t in tensors]


def student_leaves(students):
    return [v for s in students for k, v in sorted(s.items()) if v.requires_grad]


def test_total_is_the_weighted_sum_of_the_terms():
    students, teachers, views = make_batch(seed=11, requires_grad=False)
    loss = SkySenseLoss(
        12, 10, mgcl=0.7, cma=0.3, pixel_weight=2.0, object_weight=0.5, image_weight=1.5, **KW
    ).eval()
    out = loss(students, teachers, views)
    t = out.terms
    fams = ("hr", "s2", "s1", "fused")
    lw = {"pixel": 2.0, "object": 0.5, "image": 1.5}
    assert {f"mgcl/{f}/{lvl}" for f in fams for lvl in lw} <= set(t)
    mgcl = sum(lw[k.split("/")[2]] * v for k, v in t.items() if k.startswith("mgcl/"))
    cma = sum(v for k, v in t.items() if k.startswith("cma/"))
    assert {"cma/hr-s2", "cma/hr-s1", "cma/s2-s1"} <= set(t)
    torch.testing.assert_close(t["mgcl"], mgcl)
    torch.testing.assert_close(t["cma"], cma)
    torch.testing.assert_close(out.total, 0.7 * mgcl + 0.3 * cma)
    torch.testing.assert_close(t["total"], out.total)
    assert out["total"] is out.total and all(not v.requires_grad for v in t.values())


@pytest.mark.parametrize("sampling", ["nearest", "bilinear"])
def test_swapping_the_views_gives_the_same_loss(sampling):
    students, teachers, views = make_batch(seed=12)
    loss = SkySenseLoss(12, 10, pixel_sampling=sampling, **KW).eval()
    t_heads = copy.deepcopy(loss.heads)
    a = loss(students, teachers, views, t_heads)
    a.total.backward()
    ga = grads(student_leaves(students))
    for x in student_leaves(students):
        x.grad = None
    b = loss(students[::-1], teachers[::-1], views[::-1], t_heads)
    b.total.backward()
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        torch.testing.assert_close(a.terms[k], b.terms[k], rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, grads(student_leaves(students))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def pad_series(outs, views, m, n, junk):
    """Append n steps of garbage to modality m: invalid (valid False), or valid with index -1
    (a step of no known acquisition), alternately."""
    new_o, new_v = [], []
    for o, v in zip(outs, views):
        o, v = dict(o), dict(v)
        tok = o[f"tokens_{m}"]
        b, _, c, h, w = tok.shape
        o[f"tokens_{m}"] = torch.cat([tok, junk * torch.randn(b, n, c, h, w)], 1)
        valid = torch.zeros(b, n, dtype=torch.bool)
        valid[:, 1::2] = True
        o[f"valid_{m}"] = torch.cat([o[f"valid_{m}"], valid], 1)
        if f"{m}_index" in v:
            v[f"{m}_index"] = torch.cat(
                [v[f"{m}_index"], torch.full((b, n), -1, dtype=torch.long)], 1
            )
        new_o.append(o)
        new_v.append(v)
    return new_o, new_v


def test_padded_steps_change_nothing():
    students, teachers, views = make_batch(seed=13)
    loss = SkySenseLoss(12, 10, **KW).eval()
    ref = loss(students, teachers, views)
    ref.total.backward()
    g_ref = {
        (i, k): v.grad.clone()
        for i, s in enumerate(students)
        for k, v in s.items()
        if v.requires_grad
    }
    for x in student_leaves(students):
        x.grad = None
    # Padding in the student's and the teacher's outputs, s2 and s1, with huge garbage.
    s_p, t_p, v_p = students, teachers, views
    for m in ("s2", "s1"):
        s_p, v_p2 = pad_series(s_p, v_p, m, 3, 1e4)
        t_p, _ = pad_series(t_p, v_p, m, 3, 1e4)
        v_p = v_p2
    leaves = [v for s in s_p for v in s.values() if v.requires_grad]
    for x in leaves:
        x.retain_grad()
    out = loss(s_p, t_p, v_p)
    out.total.backward()
    assert ref.terms.keys() == out.terms.keys()
    for k in ref.terms:
        torch.testing.assert_close(out.terms[k], ref.terms[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(g_ref) == 8  # hr, s2, s1, fused in two views
    for (i, k), g in g_ref.items():
        got = s_p[i][k].grad
        t = students[i][k].shape[1]
        torch.testing.assert_close(got[:, :t], g, rtol=1e-4, atol=1e-7)
        assert (got[:, t:] == 0).all()  # the padding receives no gradient


def test_absent_modality_changes_nothing():
    """A batch without S1, and the same batch with S1 present but every step invalid, give the
    same terms; the shared terms equal those of the batch with S1 present and valid (S1 enters
    no other term)."""
    students, teachers, views = make_batch(seed=14, requires_grad=False)
    loss = SkySenseLoss(12, 10, **KW).eval()
    full = loss(students, teachers, views).terms

    def drop(d, keys):
        return {k: v for k, v in d.items() if k not in keys}

    s1_keys = {"tokens_s1", "valid_s1", "s1_index"}
    no_s1 = loss(
        [drop(s, s1_keys) for s in students],
        [drop(t, s1_keys) for t in teachers],
        [drop(v, s1_keys) for v in views],
    ).terms
    dead = []
    for o in students + teachers:
        o = dict(o)
        o["valid_s1"] = torch.zeros_like(o["valid_s1"])
        dead.append(o)
    invalid_s1 = loss(dead[:2], dead[2:], views).terms
    assert not any("s1" in k for k in no_s1)
    assert no_s1.keys() == invalid_s1.keys()
    for k in no_s1:
        torch.testing.assert_close(no_s1[k], invalid_s1[k])
        if "/" in k:
            torch.testing.assert_close(no_s1[k], full[k])
    # HR absent too, and fused only.
    only_fused = loss(
        [{"fused": s["fused"]} for s in students], [{"fused": t["fused"]} for t in teachers], views
    ).terms
    assert sorted(only_fused) == [
        "mgcl",
        "mgcl/fused/image",
        "mgcl/fused/object",
        "mgcl/fused/pixel",
        "total",
    ]
    for k in ("mgcl/fused/image", "mgcl/fused/object", "mgcl/fused/pixel"):
        torch.testing.assert_close(only_fused[k], full[k])


def test_entropy_floor():
    """Student = teacher (same features at the same ground, same heads, same temperature) and a
    uniform centre: every MGCL term equals the teacher's entropy, and no gradient flows."""
    students, teachers, views = make_batch(seed=15, tile=4, crop=4, consistent=True)
    loss = SkySenseLoss(12, 10, cma=0.0, student_temp=0.2, **KW).eval()
    with torch.no_grad():
        loss.centering.center.fill_(0.37)  # uniform: no effect on the softmax
    out = loss(students, teachers, views, teacher_temp=0.2)
    # The entropy of the teacher's distributions, row by row, from the same rows.
    from skysense.losses.features import family_features

    for fam in ("hr", "s2", "s1", "fused"):
        sf = [family_features(o, v, fam, "s") for o, v in zip(students, views)]
        tf = [family_features(o, v, fam, "t") for o, v in zip(teachers, views)]
        rows = {}
        for a, b in ((0, 1), (1, 0)):
            for lvl, (_, t) in loss.mgcl.pairs(
                sf[a], tf[b], views[a]["view_affine"], views[b]["view_affine"]
            ).items():
                rows.setdefault(lvl, []).append(t)
        for lvl, r in rows.items():
            assert out.rows[f"mgcl/{fam}/{lvl}"] == sum(x.shape[0] for x in r) > 0
            logits = loss.heads[fam].logits(torch.cat(r)).double() / 0.2
            p = torch.softmax(logits, -1)
            ent = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
            torch.testing.assert_close(
                out.terms[f"mgcl/{fam}/{lvl}"].double(), ent, rtol=1e-5, atol=1e-5
            )
    out.total.backward()
    for x in student_leaves(students):
        assert x.grad.abs().max() < 1e-5
    # A different centre or temperature moves the loss above the floor.
    with torch.no_grad():
        loss.centering.center.normal_()
    above = loss(students, teachers, views, teacher_temp=0.2)
    assert above.terms["mgcl/s2/pixel"] > out.terms["mgcl/s2/pixel"]


def teacher_weights(heads):
    return lambda name: heads[name.split("/")[0]].prototype_weight().detach()


def test_forward_reads_the_centres_and_returns_their_statistics():
    """The forward never moves the centres (the meta-architecture decides when they move);
    its statistics move every family's and level's centre, and an update in place before the
    backward does not break it."""
    students, teachers, views = make_batch(seed=16, requires_grad=False)
    loss = SkySenseLoss(12, 10, **KW)
    before = loss.centering.center.clone()
    out = loss.train()(students, teachers, views)
    assert torch.equal(loss.centering.center, before)
    assert set(out.stats) == set(loss.centering.names)
    with torch.no_grad():
        loss.centering.update(out.stats, teacher_weights(loss.heads))
    out.total.backward()  # the in-place centre update must not break the backward
    assert all(p.grad is not None for p in loss.heads.parameters())
    changed = (loss.centering.center != before).any(1)
    assert changed.all()  # every family and level had rows


def test_teacher_temperature_given_or_the_constructors():
    students, teachers, views = make_batch(seed=17, requires_grad=False)
    loss = SkySenseLoss(12, 10, teacher_temp=0.08, **KW)
    assert loss(students, teachers, views).teacher_temp == pytest.approx(0.08)
    out = loss(students, teachers, views, teacher_temp=0.5)
    assert out.teacher_temp == 0.5
    # The temperature reaches the loss: a softer teacher gives another value.
    assert not torch.isclose(out.total, loss(students, teachers, views).total)


def test_bad_inputs_are_named():
    students, teachers, views = make_batch(seed=18, requires_grad=False)
    loss = SkySenseLoss(12, 10, **KW)
    with pytest.raises(ValueError, match="same number"):
        loss(students[:1], teachers[:1], views[:1])
    with pytest.raises(ValueError, match="view 2 lacks 'view_affine'"):
        loss(students, teachers, [views[0], {}])
    bad = dict(students[0])
    bad["valid_s2"] = bad["valid_s2"][:, :2]
    with pytest.raises(ValueError, match=r"student view 1: 'valid_s2' has shape \(3, 2\)"):
        loss([bad, students[1]], teachers, views)
    no_idx = dict(views[1])
    del no_idx["s1_index"]
    with pytest.raises(ValueError, match="view 2: the view lacks 's1_index'"):
        loss(students, teachers, [views[0], no_idx])
    t = dict(teachers[0])
    del t["tokens_hr"], t["valid_hr"]
    with pytest.raises(ValueError, match="teacher output lacks the hr"):
        loss(students, [t, teachers[1]], views)


def test_bf16_autocast_forward_and_backward():
    """The trainer runs the loss under bf16 autocast (the CUDA default): the whole loss,
    training mode (centre update) and backward, and the GCPL update, on bf16 encoder outputs,
    run and stay close to float32 on the same values."""
    students, teachers, views = make_batch(b=4, seed=19, requires_grad=False)

    def outputs(outs, dtype, grad):
        res = []
        for o in outs:
            o = dict(o)
            for k in o:
                if k.startswith("tokens_") or k == "fused":
                    o[k] = o[k].to(torch.bfloat16).to(dtype).requires_grad_(grad)
            res.append(o)
        return res

    def step(dtype, sampling):
        torch.manual_seed(0)
        loss = SkySenseLoss(12, 10, pixel_sampling=sampling, **KW).train()
        t_heads = copy.deepcopy(loss.heads)
        s, t = outputs(students, dtype, True), outputs(teachers, dtype, False)
        protos = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = loss(s, t, views, t_heads, teacher_temp=0.04)
            with torch.no_grad():
                loss.centering.update(out.stats, teacher_weights(t_heads))
            fused = torch.cat([o["fused"] for o in t])
            loss.gcpl.update(protos, fused, torch.cat([o["region"] for o in t]))
        out.total.backward()  # outside autocast, as the trainer does
        grads = {(i, k): v.grad for i, o in enumerate(s) for k, v in o.items() if v.requires_grad}
        return out, loss, grads, protos

    for sampling in ("nearest", "bilinear"):
        out, loss, grads, protos = step(torch.bfloat16, sampling)
        ref, ref_loss, ref_grads, ref_protos = step(torch.float32, sampling)
        assert out.terms.keys() == ref.terms.keys() and len(out.terms) == 18
        for k, v in out.terms.items():
            assert v.dtype == torch.float32 and torch.isfinite(v), k
            torch.testing.assert_close(v, ref.terms[k], rtol=5e-3, atol=0, msg=k)
        assert len(grads) == 8
        for key, g in grads.items():
            assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), key
            cos = F.cosine_similarity(g.double().flatten(), ref_grads[key].double().flatten(), 0)
            assert cos > 0.999, (key, float(cos))
        for p in loss.parameters():
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert loss.centering.center.dtype == torch.float32
        torch.testing.assert_close(
            loss.centering.center, ref_loss.centering.center, rtol=0, atol=1e-3
        )
        assert protos.dtype == torch.float32
        torch.testing.assert_close(protos, ref_protos, rtol=0, atol=1e-3)
    # The kernels' reference backends (what the GPU bench forces to count FLOPs) under autocast.
    from skysense.kernels import force_backend

    with (
        force_backend("prototype_cross_entropy", "reference"),
        force_backend("info_nce", "reference"),
    ):
        out, *_ = step(torch.bfloat16, "nearest")
    ref = step(torch.float32, "nearest")[0]
    for k, v in out.terms.items():
        torch.testing.assert_close(v, ref.terms[k], rtol=2e-2, atol=0, msg=k)

"""MGCL against a naive float64 implementation (loops, materialised logits): values and
gradients of every family and granularity; the pixel-pair cap; the object clustering."""

from __future__ import annotations

import copy

import losses_naive as naive
import pytest
import torch
from losses_synth import make_batch

from skysense.losses import MultiGranularityContrastiveLoss, SkySenseLoss
from skysense.losses.features import FAMILIES, family_features
from skysense.losses.mgcl import cap_per_group, cluster_assignments

pytestmark = pytest.mark.unit

ST, TT = 0.1, 0.05
KW = dict(n_prototypes=41, head_hidden_dim=24, head_bottleneck_dim=16, n_clusters=3)


def as_naive(feats: list, double=True):
    out = []
    for f in feats:
        if f is None:
            out.append(None)
            continue
        out.append((f.tokens, f.valid, f.index))
    return out


def perturbed_copy(heads):
    t = copy.deepcopy(heads)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std().clamp_min(1e-3))
    return t


@pytest.mark.parametrize("seed", [0, 1])
def test_every_family_and_level_against_naive(seed):
    students, teachers, views = make_batch(seed=seed)
    loss = SkySenseLoss(12, 10, cma=0.0, student_temp=ST, **KW).eval()
    with torch.no_grad():
        loss.centering.center.copy_(torch.randn_like(loss.centering.center))
    t_heads = perturbed_copy(loss.heads)
    out = loss(students, teachers, views, t_heads, teacher_temp=TT)
    out.total.backward()

    # The naive side: float64 leaf copies of the student tokens, float64 copies of the heads.
    s64 = [
        {
            k: (v.detach().double().requires_grad_(True) if v.is_floating_point() else v)
            for k, v in s.items()
        }
        for s in students
    ]
    t64 = [
        {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()} for t in teachers
    ]
    heads64 = naive.double_head(loss.heads)
    t_heads64 = naive.double_head(t_heads)
    affines = [v["view_affine"] for v in views]
    total = 0
    n_terms = 0
    for fam in FAMILIES:
        sf = [family_features(o, v, fam, "s") for o, v in zip(s64, views)]
        tf = [family_features(o, v, fam, "t") for o, v in zip(t64, views)]
        centers = {lvl: loss.centering.get(f"{fam}/{lvl}") for lvl in ("pixel", "object", "image")}
        exp = naive.mgcl_family(
            as_naive(sf),
            as_naive(tf),
            affines,
            heads64[fam],
            t_heads64[fam],
            centers,
            ST,
            TT,
            n_c=3,
        )
        assert exp, fam
        for lvl, val in exp.items():
            got = out.terms[f"mgcl/{fam}/{lvl}"]
            torch.testing.assert_close(got.double(), val.detach(), rtol=2e-5, atol=2e-5)
            total = total + val
            n_terms += 1
    assert n_terms == len([k for k in out.terms if k.startswith("mgcl/")])
    torch.testing.assert_close(out.total.double(), total.detach(), rtol=2e-5, atol=2e-5)
    total.backward()

    def close(a, b, name):
        scale = b.abs().max().clamp_min(1e-8)
        err = (a.double() - b).abs().max() / scale
        assert err < 2e-4, f"{name}: relative error {err:.2e}"

    for v in range(2):
        for k, x in students[v].items():
            if x.requires_grad:
                assert x.grad is not None and s64[v][k].grad is not None, k
                close(x.grad, s64[v][k].grad, f"view {v} {k}")
    p64 = dict(heads64.named_parameters())
    for name, p in loss.heads.named_parameters():
        close(p.grad, p64[name].grad, name)
    for p in t_heads.parameters():
        assert p.grad is None  # no gradient through the teacher side


def test_bilinear_matches_nearest_on_aligned_crops():
    students, teachers, views = make_batch(seed=3, requires_grad=False)
    a = SkySenseLoss(12, 10, pixel_sampling="nearest", **KW).eval()
    b = SkySenseLoss(12, 10, pixel_sampling="bilinear", **KW).eval()
    b.load_state_dict(a.state_dict())
    ta, tb = a(students, teachers, views).terms, b(students, teachers, views).terms
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5)


def test_pixel_cap():
    students, teachers, views = make_batch(b=4, seed=5, tile=4, crop=4, requires_grad=False)
    fam = "s2"
    s = family_features(students[0], views[0], fam, "s")
    t = family_features(teachers[1], views[1], fam, "t")
    full = MultiGranularityContrastiveLoss(n_clusters=3)
    capped = MultiGranularityContrastiveLoss(n_clusters=3, max_pixel_pairs=5)
    aff = (views[0]["view_affine"], views[1]["view_affine"])
    all_rows = full.pairs(s, t, *aff)["pixel"][0]
    few = capped.pairs(s, t, *aff)
    rows = few["pixel"][0]
    # Every capped row is one of the full rows, and each sample keeps min(5, its pairs).
    assert rows.shape[0] < all_rows.shape[0]
    match = (rows[:, None, :] == all_rows[None, :, :]).all(-1)
    assert match.any(1).all()
    owner = torch.repeat_interleave(
        torch.arange(4),
        torch.tensor(
            [
                int(
                    (
                        (s.valid[i][:, None])
                        & (t.valid[i][None])
                        & (s.index[i][:, None] == t.index[i][None])
                    ).sum()
                )
                * 16
                for i in range(4)
            ]
        ),
    )
    per_sample_full = torch.bincount(owner, minlength=4)
    kept = torch.bincount(owner[match.float().argmax(1)], minlength=4)
    assert (kept == per_sample_full.clamp(max=5)).all()
    # The cap leaves the other levels alone.
    torch.testing.assert_close(few["object"][0], full.pairs(s, t, *aff)["object"][0])


def test_cap_per_group_is_uniform_and_bounded():
    groups = torch.tensor([0] * 10 + [1] * 2 + [3] * 5)
    hits = torch.zeros(groups.numel())
    for _ in range(400):
        keep = cap_per_group(groups, 3)
        assert torch.bincount(groups[keep], minlength=4).tolist() == [3, 2, 0, 3]
        hits[keep] += 1
    # Every row of group 0 is kept about 3/10 of the time (binomial, 400 draws).
    assert ((hits[:10] / 400 - 0.3).abs() < 0.12).all()
    assert cap_per_group(torch.zeros(0, dtype=torch.long), 3).numel() == 0


def test_cluster_assignments_against_naive():
    x = torch.randn(3, 9, 6, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, ::2] = False
    mask[2, :7] = False  # two pixels only, fewer than the 3 clusters
    got = cluster_assignments(x, mask, 3, n_rounds=3, sinkhorn_iters=3, epsilon=0.05)
    for i in range(3):
        exp = naive.cluster(x[i][mask[i]], 3, 3, 3, 0.05)
        torch.testing.assert_close(got[i][mask[i]], exp, rtol=1e-4, atol=1e-5)
        assert (got[i][~mask[i]] == 0).all()
        torch.testing.assert_close(
            got[i][mask[i]].sum(1), torch.ones(int(mask[i].sum()), dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="no valid pixel"):
        cluster_assignments(x, torch.zeros(3, 9, dtype=torch.bool), 3)


def test_cluster_assignments_under_bf16_autocast():
    """The trainer's bf16 autocast (the CUDA default) used to crash the index put of the
    assignments; the clustering runs in float32 whatever autocast says."""
    x = torch.randn(2, 16, 8)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 5:9] = False
    ref = cluster_assignments(x, mask, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cluster_assignments(x, mask, 4)
        got_bf16 = cluster_assignments(x.bfloat16(), mask, 4)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), ref, rtol=0, atol=0.05)


def test_object_centres_follow_the_ground():
    """Two well separated objects in the tile: the teacher's clusters split them, so each
    student centre pools one object's pixels only."""
    b, c = 1, 8
    field = torch.zeros(b, 1, c, 4, 4)
    field[..., :2] = torch.nn.functional.normalize(torch.randn(c), dim=0)[:, None, None]
    field[..., 2:] = torch.nn.functional.normalize(torch.randn(c), dim=0)[:, None, None]
    tok = field + 0.01 * torch.randn_like(field)
    mgcl = MultiGranularityContrastiveLoss(n_clusters=2, sinkhorn_epsilon=0.05)
    from skysense.losses.features import FamilyFeatures

    f = FamilyFeatures(tok, torch.ones(b, 1, dtype=torch.bool), torch.zeros(b, 1, dtype=torch.long))
    ident = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    s_c, _ = mgcl.pairs(f, f, ident, ident)["object"]
    left, right = tok[0, 0, :, :, :2].mean((1, 2)), tok[0, 0, :, :, 2:].mean((1, 2))
    d = torch.cdist(s_c, torch.stack([left, right]))
    assert (d.min(1).values < 0.05).all() and set(d.argmin(1).tolist()) == {0, 1}

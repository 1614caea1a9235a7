"""Pixel and time-step correspondence between two views."""

from __future__ import annotations

import pytest
import torch
from losses_naive import mapped_cell
from losses_synth import view_affine

from skysense.losses import match_steps, pixel_correspondence
from skysense.losses.correspondence import sample_cells

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("size_a", "size_b"), [((3, 3), (3, 3)), ((4, 4), (2, 2)), ((3, 3), (5, 5))]
)
def test_against_cell_by_cell_mapping(size_a, size_b):
    gen = torch.Generator().manual_seed(1)
    b = 6
    aff_a = view_affine(b, 7, 4, gen)
    aff_b = view_affine(b, 7, 5, gen)
    corr = pixel_correspondence(aff_a, aff_b, size_a, size_b)
    assert corr.index.shape == corr.inside.shape == (b, size_a[0] * size_a[1])
    n_inside = 0
    for i in range(b):
        for y in range(size_a[0]):
            for x in range(size_a[1]):
                p = y * size_a[1] + x
                m = mapped_cell(aff_a[i], aff_b[i], y, x, size_a, size_b)
                assert bool(corr.inside[i, p]) == (m is not None)
                if m is not None:
                    n_inside += 1
                    assert int(corr.index[i, p]) == m[0] * size_b[1] + m[1]
    assert 0 < n_inside < corr.inside.numel()  # the crops overlap partly: both cases are tested


def test_same_view_maps_every_cell_to_itself():
    gen = torch.Generator().manual_seed(2)
    aff = view_affine(4, 6, 3, gen)
    corr = pixel_correspondence(aff, aff, (3, 3), (3, 3))
    assert corr.inside.all()
    assert (corr.index == torch.arange(9)).all()


def test_flip_reverses_columns():
    ident = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    flip = torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]])
    corr = pixel_correspondence(ident, flip, (2, 3), (2, 3))
    assert corr.index.tolist() == [[2, 1, 0, 5, 4, 3]]


def test_bilinear_equals_nearest_on_cell_centres():
    gen = torch.Generator().manual_seed(3)
    aff_a, aff_b = view_affine(3, 6, 4, gen), view_affine(3, 6, 4, gen)
    corr = pixel_correspondence(aff_a, aff_b, (4, 4), (4, 4))
    feats = torch.randn(5, 7, 4, 4)
    rows = torch.tensor([0, 1, 2, 2, 0])
    near = sample_cells(feats, corr, rows, "nearest")
    bil = sample_cells(feats, corr, rows, "bilinear")
    inside = corr.inside[rows][:, None, :].expand_as(near)
    torch.testing.assert_close(bil[inside], near[inside])
    with pytest.raises(ValueError, match="nearest"):
        sample_cells(feats, corr, rows, "cubic")


def test_bad_affines():
    good = torch.zeros(2, 2, 3)
    good[:, 0, 0] = good[:, 1, 1] = 1
    with pytest.raises(ValueError, match=r"\(B, 2, 3\)"):
        pixel_correspondence(torch.zeros(2, 3, 3), good, (2, 2), (2, 2))
    with pytest.raises(ValueError, match="singular for samples \\[1\\]"):
        bad = good.clone()
        bad[1, :, :2] = 0
        pixel_correspondence(good, bad, (2, 2), (2, 2))


def test_match_steps_against_loops():
    gen = torch.Generator().manual_seed(4)
    b, ta, tb = 5, 4, 6
    ia = torch.randint(-1, 7, (b, ta), generator=gen)
    ib = torch.randint(-1, 7, (b, tb), generator=gen)
    va = torch.rand(b, ta, generator=gen) > 0.2
    vb = torch.rand(b, tb, generator=gen) > 0.2
    m = match_steps(ia, va, ib, vb)
    got = set(zip(m.sample.tolist(), m.step_a.tolist(), m.step_b.tolist()))
    exp = {
        (i, x, y)
        for i in range(b)
        for x in range(ta)
        for y in range(tb)
        if va[i, x] and vb[i, y] and ia[i, x] >= 0 and ia[i, x] == ib[i, y]
    }
    assert got == exp and len(exp) > 0

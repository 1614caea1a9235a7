"""Cross-modal alignment against a naive float64 implementation: values and gradients; samples
and modalities that are absent."""

from __future__ import annotations

import copy

import losses_naive as naive
import pytest
import torch
from losses_synth import make_batch

from skysense.losses import CrossModalAlignment

pytestmark = pytest.mark.unit


def double_proj(cma):
    return {m: copy.deepcopy(p).double() for m, p in cma.proj.items()}


@pytest.mark.parametrize("proj_dim", [8, None])
def test_against_naive(proj_dim):
    students, _, _ = make_batch(b=4, seed=7)
    # One sample without any valid s1 step: left out of the pairs with s1 only.
    for s in students:
        s["valid_s1"][2] = False
    cma = CrossModalAlignment(12, proj_dim=proj_dim, temperature=0.2)
    got = cma(students)
    assert sorted(got) == ["hr-s1", "hr-s2", "s2-s1"]
    s64 = [
        {
            k: (v.detach().double().requires_grad_(True) if v.is_floating_point() else v)
            for k, v in s.items()
        }
        for s in students
    ]
    proj64 = double_proj(cma)
    exp = naive.cma(s64, proj64, 0.2)
    for k in exp:
        torch.testing.assert_close(got[k].double(), exp[k].detach(), rtol=1e-5, atol=1e-5)
    sum(got.values()).backward()
    sum(exp.values()).backward()
    for v in range(2):
        for m in ("hr", "s2", "s1"):
            a, b = students[v][f"tokens_{m}"].grad, s64[v][f"tokens_{m}"].grad
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    # Padded / invalid steps get no gradient at all.
    for v in range(2):
        g = students[v]["tokens_s2"].grad
        assert (g[~students[v]["valid_s2"]] == 0).all()
    if proj_dim:
        for m in ("hr", "s2", "s1"):
            torch.testing.assert_close(
                cma.proj[m].weight.grad.double(), proj64[m].weight.grad, rtol=1e-4, atol=1e-6
            )


def test_absent_modality_drops_its_pairs_only():
    students, _, _ = make_batch(b=3, seed=8, modalities=("hr", "s2"))
    cma = CrossModalAlignment(12, proj_dim=8)
    got = cma(students)
    assert list(got) == ["hr-s2"]
    s64 = [
        {k: (v.detach().double() if v.is_floating_point() else v) for k, v in s.items()}
        for s in students
    ]
    exp = naive.cma(s64, double_proj(cma), 0.1, pairs=(("hr", "s2"),))
    torch.testing.assert_close(got["hr-s2"].double(), exp["hr-s2"].detach(), rtol=1e-5, atol=1e-5)
    assert cma([{"fused": torch.randn(2, 10, 3, 3)}] * 2) == {}


def test_garbage_in_padded_steps_changes_nothing():
    students, _, _ = make_batch(b=3, seed=9, requires_grad=False)
    cma = CrossModalAlignment(12, proj_dim=8)
    ref = cma(students)
    padded = []
    for s in students:
        s = dict(s)
        b, t, c, h, w = s["tokens_s2"].shape
        s["tokens_s2"] = torch.cat([s["tokens_s2"], 1e3 * torch.randn(b, 2, c, h, w)], 1)
        s["valid_s2"] = torch.cat([s["valid_s2"], torch.zeros(b, 2, dtype=torch.bool)], 1)
        padded.append(s)
    got = cma(padded)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])

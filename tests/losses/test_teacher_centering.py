"""Teacher centring (EMA of the mean logits, never forming them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense.losses import TeacherCentering

pytestmark = pytest.mark.unit


def test_centre_update_against_materialised_logits():
    k, d, m = 53, 7, 0.9
    c = TeacherCentering(["a", "b", "c"], k, d, momentum=m)
    with torch.no_grad():
        c.center.copy_(torch.randn(3, k))
    old = c.center.clone()
    za = F.normalize(torch.randn(19, d, dtype=torch.float64), dim=-1)
    zb = F.normalize(torch.randn(5, d, dtype=torch.float64), dim=-1)
    w = {"a": torch.randn(k, d), "b": torch.randn(k, d), "c": torch.randn(k, d)}
    called = []

    def weight(name):
        called.append(name)
        return w[name]

    c.update({"a": (za.sum(0), 19), "b": (zb.sum(0), 5)}, weight)
    exp_a = m * old[0].double() + (1 - m) * (za @ w["a"].double().t()).mean(0)
    exp_b = m * old[1].double() + (1 - m) * (zb @ w["b"].double().t()).mean(0)
    torch.testing.assert_close(c.get("a").double(), exp_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.get("b").double(), exp_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.get("c"), old[2])  # no rows anywhere: unchanged
    assert sorted(called) == ["a", "b"]  # the weight of an unseen set is never computed


def test_centre_errors():
    c = TeacherCentering(["a"], 4, 3)
    with pytest.raises(KeyError, match="zz"):
        c.update({"zz": (torch.zeros(3), 1)}, lambda n: torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        c.update({"a": (torch.zeros(2), 1)}, lambda n: torch.zeros(4, 3))

"""The label-free health signals of pre-training against hand-computed values, and the
collapse warnings on a teacher that collapsed."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from skysense.losses.dino_head import DINOHead
from skysense.tasks.training import health as H

pytestmark = pytest.mark.unit


def test_rankme_of_known_spectra():
    assert H.rankme(torch.eye(7)) == pytest.approx(7.0, rel=1e-5)
    rank1 = torch.randn(20, 1) @ torch.randn(1, 9)
    assert H.rankme(rank1) == pytest.approx(1.0, abs=1e-3)
    # Singular values 3 and 1: p = (3/4, 1/4), exp(H) = exp(-(.75 ln .75 + .25 ln .25)).
    z = torch.diag(torch.tensor([3.0, 1.0]))
    assert H.rankme(z) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-5
    )


def test_entropy_retrieval_and_knn():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert torch.allclose(H.entropy(p), torch.tensor([math.log(2), 0.0]), atol=1e-6)
    a = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    assert H.retrieval_top1(a, a * 3.0) == 1.0
    assert H.retrieval_top1(a, a.roll(1, dims=0)) == 0.0
    centres = torch.eye(3) * 10
    g = torch.Generator().manual_seed(0)
    x = centres.repeat_interleave(25, 0) + torch.randn(75, 3, generator=g)
    y = torch.arange(3).repeat_interleave(25)
    assert H.knn_accuracy(x, y, centres, torch.arange(3)) == 1.0


class _Collapsed(nn.Module):
    """An encoder whose fused features are the same for every sample."""

    def forward(self, batch):
        n = batch["x"].shape[0]
        return {"fused": torch.ones(n, 8, 2, 2)}


def test_a_collapsed_teacher_is_flagged(caplog):
    teacher = nn.Module()
    teacher.encoder = _Collapsed()
    teacher.heads = nn.ModuleDict(
        {"fused": DINOHead(8, n_prototypes=16, hidden_dim=8, bottleneck_dim=4)}
    )
    mon = H.HealthMonitor(teacher, [{"x": torch.zeros(12, 1)}])
    with caplog.at_level(logging.WARNING):
        sig = mon(temp=0.04, step=10)
        mon(temp=0.04, step=20)
    assert sig["emb_std"] == pytest.approx(0.0, abs=1e-6)
    assert sig["proto_usage"] == pytest.approx(1 / 16)
    assert sig["proto_entropy_mean"] == pytest.approx(sig["proto_entropy_sample"], abs=1e-5)
    warned = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    assert any("emb_std" in w for w in warned) and any("rankme" in w for w in warned)
    assert len(warned) == len(set(warned))  # once per signal, not at every call
    line = H.health_line(sig)
    assert line.startswith("health: RankMe") and "usage 0.06" in line

"""The benchmark's statistics and probes against hand-computed values and known optima."""

from __future__ import annotations

import math

import pytest
import torch

from skysense.tasks.benchmark import probes, stats
from skysense.tasks.benchmark.protocols import folds, plateaued

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 2, 3, 4], 2.5),  # cut 1 each end: mean(2, 3)
        ([1, 2, 3, 4, 5, 6, 7, 8], 4.5),  # cut 2 each end: mean(3, 4, 5, 6)
        ([5, 1, 100, 2], 3.5),  # sorted 1 2 5 100 -> mean(2, 5)
        ([1, 2, 4], 7 / 3),  # fewer than 4 values: nothing cut
        ([1, 2, 3, 4, 100], 3.0),  # floor(1.25) = 1 cut each end: mean(2, 3, 4)
    ],
)
def test_iqm_hand_computed(values, expected):
    assert stats.iqm(values) == pytest.approx(expected, abs=1e-12)


def test_iqm_empty_is_nan():
    assert math.isnan(stats.iqm([]))


def test_bootstrap_interval_of_three_values():
    # The 27 equally likely resamples of (1, 2, 4) have means 1 (1 way), 4/3 (3), 5/3 (3), 2 (4),
    # 7/3 (6), 8/3 (3), 3 (3), 10/3 (3), 4 (1): CDF 1/27 = 0.037 at the minimum and at least
    # 0.963 below the maximum, so the 2.5 / 97.5 % points are 1 and 4; the 25 % point is 5/3
    # (CDF 4/27 = 0.148 below it, 7/27 = 0.259 at it) and the 75 % point 3 (20/27 = 0.741 below).
    lo, hi = stats.bootstrap_ci([1, 2, 4], n_boot=200_000, seed=1)
    assert (lo, hi) == (1.0, 4.0)
    lo, hi = stats.bootstrap_ci([1, 2, 4], n_boot=200_000, level=0.5, seed=1)
    assert lo == pytest.approx(5 / 3, abs=1e-12)
    assert hi == pytest.approx(3.0, abs=1e-12)


def test_bootstrap_interval_edge_cases():
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7)
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))
    # two values: resample means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert stats.bootstrap_ci([0.0, 1.0], n_boot=50_000) == (0.0, 1.0)
    # IQM as the statistic over resamples of (0, 0, 0, 9): K nines ~ Binomial(4, 1/4), IQM 0 for
    # K <= 1 (P 0.738), 4.5 for K = 2 (P 0.211), 9 for K >= 3 (P 0.051): the 97.5 % point is 9,
    # the 90 % point 4.5, the lower points 0
    lo, hi = stats.bootstrap_ci([0, 0, 0, 9], statistic=stats.iqm, n_boot=20_000)
    assert (lo, hi) == (0.0, 9.0)
    lo, hi = stats.bootstrap_ci([0, 0, 0, 9], statistic=stats.iqm, n_boot=20_000, level=0.8)
    assert (lo, hi) == (0.0, 4.5)


def test_summarise_hand_computed():
    s = stats.summarise([1.0, 2.0, 3.0, 4.0, float("nan")], n_boot=1000)
    assert s["n"] == 4
    assert s["mean"] == 2.5
    assert s["iqm"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5 / 3), abs=1e-12)
    assert s["ci95"][0] >= 1.0 and s["ci95"][1] <= 4.0


def test_normalise_hand_computed():
    assert stats.normalise(0.8, 0.6) == pytest.approx(0.5)
    assert stats.normalise(0.5, 0.6) == pytest.approx(-0.25)
    assert stats.normalise(0.6, 0.6) == 0.0
    assert math.isnan(stats.normalise(0.9, 1.0))


def test_aggregate_normalised_hand_computed():
    agg = stats.aggregate_normalised(
        {"a": [0.8, 0.8], "b": [0.7, 0.7], "c": [0.9]}, {"a": 0.6, "b": 0.4}, n_boot=2000
    )
    assert set(agg["entries"]) == {"a", "b"}  # c has no random-init reference
    assert agg["entries"]["a"] == pytest.approx(0.5)
    assert agg["entries"]["b"] == pytest.approx(0.5)
    assert agg["mean"] == pytest.approx(0.5)
    assert agg["ci95"] == pytest.approx([0.5, 0.5])
    # one entry, seeds 0.6 and 1.0 against 0.6: resampled means 0.6 / 0.8 / 1.0 w.p. 1/4, 1/2,
    # 1/4 -> normalised 0, 0.5, 1; the mean's normalised score 0.5
    agg = stats.aggregate_normalised({"a": [0.6, 1.0]}, {"a": 0.6}, n_boot=50_000)
    assert agg["mean"] == pytest.approx(0.5)
    assert agg["ci95"] == pytest.approx([0.0, 1.0])


def _newton(x, y, n_out, l2, multilabel=False, iters=15):
    """Independent float64 Newton solve of the same objective (full Hessian)."""
    d = x.shape[1]
    theta = torch.zeros(n_out * d + n_out, dtype=torch.float64)

    def f(t):
        w, b = t[: n_out * d].view(n_out, d), t[n_out * d :]
        return probes._loss(w, b, x, y, l2, multilabel)

    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, theta)
        h = torch.autograd.functional.hessian(f, theta)
        # the softmax objective is flat along "add a constant to every class"; lstsq takes the
        # minimum-norm step, which keeps the iterate at the L-BFGS solution's gauge (zero start)
        theta = theta - torch.linalg.lstsq(h, g[:, None]).solution[:, 0]
    return theta[: n_out * d].view(n_out, d), theta[n_out * d :], f(theta).item()


def test_linear_probe_reaches_newton_optimum_multinomial():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=g, dtype=torch.float64)
    w_true = torch.randn(3, 4, generator=g, dtype=torch.float64) * 2
    y = torch.distributions.Categorical(logits=x @ w_true.T).sample()
    m = probes.fit_logistic(x, y, 3, l2=0.01)
    w, b, loss = _newton(x, y, 3, 0.01)
    assert m["converged"]
    assert m["loss"] == pytest.approx(loss, abs=1e-10)
    # softmax logits are defined up to a per-class constant shift: compare the weights (L2
    # pins them) and the centred biases
    assert torch.allclose(m["weight"], w, atol=1e-5)
    assert torch.allclose(m["bias"] - m["bias"].mean(), b - b.mean(), atol=1e-5)


def test_linear_probe_reaches_newton_optimum_multilabel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(60, 2, generator=g, dtype=torch.float64) < torch.sigmoid(x[:, :2])).double()
    m = probes.fit_logistic(x, y, 2, l2=0.05, multilabel=True)
    w, b, loss = _newton(x, y, 2, 0.05, multilabel=True)
    assert m["loss"] == pytest.approx(loss, abs=1e-10)
    assert torch.allclose(m["weight"], w, atol=1e-5)
    assert torch.allclose(m["bias"], b, atol=1e-5)


def test_linear_probe_analytic_symmetric_case():
    # Two points x = +1 (class 1) and x = -1 (class 0), two-class softmax with weights w0 = -w1
    # at the optimum (bias 0 by symmetry). With u = w1 - w0 = 2 w1, the loss is
    # log(1 + exp(-u)) + l2 * u^2 / 2, stationary where exp(-u) / (1 + exp(-u)) = l2 * u.
    l2 = 0.1
    u = 1.0
    for _ in range(100):  # fixed point by Newton on h(u) = sigmoid(-u) - l2 u
        s = 1 / (1 + math.exp(u))
        u -= (s - l2 * u) / (-s * (1 - s) - l2)
    m = probes.fit_logistic(
        torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([1, 0]), 2, l2
    )
    assert (m["weight"][1, 0] - m["weight"][0, 0]).item() == pytest.approx(u, abs=1e-6)
    assert (m["bias"][1] - m["bias"][0]).item() == pytest.approx(0.0, abs=1e-8)


def test_knn_weighted_vote_hand_computed():
    xt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    yt = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    # k = 1: the nearest (cosine 1) is row 0 -> class 0 with all the weight
    assert probes.knn_scores(xt, yt, q, 2, k=1).tolist() == [[1.0, 0.0]]
    # k = 2: rows 0 (sim 1) and 2 (sim 1/sqrt(1.01)), weights exp((s - 1) / 0.07)
    s2 = 1 / math.sqrt(1.01)
    w0, w2 = 1.0, math.exp((s2 - 1) / 0.07)
    p = probes.knn_scores(xt, yt, q, 2, k=2)
    assert p[0, 0].item() == pytest.approx(w0 / (w0 + w2), abs=1e-6)
    assert p[0, 1].item() == pytest.approx(w2 / (w0 + w2), abs=1e-6)


def test_best_threshold_and_pr_curve_hand_computed():
    p = torch.tensor([0.1, 0.4, 0.6, 0.9])
    y = torch.tensor([0, 1, 0, 1])
    # above 0.1 and up to 0.4: predicted {0.4, 0.6, 0.9}, F1 = 2*2 / (3 + 2) = 0.8 (the best)
    t = probes.best_threshold(p, y)
    assert 0.1 < t <= 0.4
    curve = probes.pr_curve(p, y, n=11)  # thresholds 0, 0.1, ..., 1
    assert curve["precision"][5] == pytest.approx(0.5)  # t = 0.5: {0.6, 0.9}, one true
    assert curve["recall"][5] == pytest.approx(0.5)
    assert curve["recall"][0] == 1.0 and math.isnan(curve["precision"][10])


def test_subsets_and_folds():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    keep = probes.stratified_subset(y, 0.5, seed=3)
    assert sorted(y[keep].tolist()) == [0, 0, 1]
    fs = folds(y, 2, seed=0)
    assert sorted(torch.cat(fs).tolist()) == list(range(6))
    assert all(sorted(y[f].tolist()) == [0, 0, 1] for f in fs)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    tr, va = probes.split_validation(y, groups, 0.34, seed=0)
    assert len(va) == 2 and len(set(groups[va].tolist())) == 1
    assert set(tr.tolist()) | set(va.tolist()) == set(range(6))


def test_run_probe_separable_blobs_scores_one():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    y = torch.arange(3).repeat(30)
    x = centres[y] + 0.3 * torch.randn(90, 2, generator=g)
    for method in ("linear", "knn"):
        r = probes.run_probe(method, "classification", 3, (x[:50], y[:50]), (x[50:70], y[50:70]),
                             (x[70:], y[70:]), k=5)  # fmt: skip
        assert r["test"]["OA"] == 1.0
    assert r["test_probs"].shape == (20, 3)


def test_plateau_rule():
    assert plateaued([5, 4, 3, 2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert not plateaued([10, 9, 8, 7, 6, 5, 4, 3, 2, 1.0])
    assert plateaued([1.0, 2.0]) is None


def test_f1_at_a_threshold():
    from skysense.tasks.downstream.validation import f1_at

    # p >= 0.65 marks rows 1 (0.7) and 3 (0.9); the only change is row 3: P 0.5, R 1
    p, y = torch.tensor([0.1, 0.7, 0.6, 0.9]), torch.tensor([0, 0, 0, 1])
    assert f1_at(p, y, 0.65) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1_at(p, y, 0.95) == pytest.approx(0.0)
    assert math.isnan(f1_at(p, torch.zeros(4, dtype=torch.long), 0.95))


def test_stop_cell():
    from skysense.tasks.benchmark.report import stop_cell

    assert stop_cell([{"score": 0.5}]) == "n/a"  # probes
    assert stop_cell([{"stop": "budget", "best_step": None}] * 2) == "budget"
    runs = [{"stop": "early", "best_step": 40, "budget_steps": 150},
            {"stop": "budget", "best_step": 150, "budget_steps": 150}]  # fmt: skip
    assert stop_cell(runs) == "early 1/2, best 40, 150 of 150"


def test_stop_record_plateau_from_the_validation_curve():
    from skysense.tasks.benchmark.protocols import stop_record

    evals = [{"step": s, "val": v} for s, v in ((25, 0.2), (50, 0.5), (75, 0.4), (100, 0.45))]
    es = {"evals": evals, "best_step": 50, "budget": 100, "stopped_early": False, "patience": 2}
    r = stop_record(es, [])
    assert r["plateaued"] is True and r["stop"] == "budget" and r["best_step"] == 50
    assert stop_record({**es, "patience": 3}, [])["plateaued"] is False  # 2 evals after best
    assert stop_record({**es, "best_step": 100, "patience": None}, [])["plateaued"] is False
    assert stop_record({**es, "stopped_early": True}, [])["stop"] == "early"
    # no validation: the loss-curve rule
    assert stop_record(None, [{"loss": v} for v in [5, 4, 3, 2] + [1.0] * 6])["plateaued"]

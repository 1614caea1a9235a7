"""L-TAE (lightweight temporal attention encoder): against a per-pixel loop written from the
paper's equations, padded dates left out, the temporal task model on a series source, and the
benchmark's frozen_upernet_ltae protocol on a fake PASTIS series."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from skysense.tasks.downstream.temporal import LTAE, TemporalTaskModel, doy_encoding

pytestmark = pytest.mark.unit


def _reference(m: LTAE, x, doy, valid):
    """One pixel at a time, one head at a time, with plain loops over the dates."""
    b, t, d, h, w = x.shape
    out = torch.zeros(b, m.out_channels, h, w)
    dh = m.d_model // m.n_head
    for bi in range(b):
        pe = [doy_encoding(doy[bi, j : j + 1], m.d_model)[0] for j in range(t)]
        for i in range(h):
            for k in range(w):
                xs = [m.inp(m.in_norm(x[bi, j, :, i, k])) + pe[j] for j in range(t)]
                heads = []
                for hh in range(m.n_head):
                    q = m.query[hh]
                    ks = [m.key(xj).view(m.n_head, m.d_k)[hh] for xj in xs]
                    e = [float(q @ kj) / math.sqrt(m.d_k) for kj in ks]
                    e = [e[j] if valid[bi, j] else -math.inf for j in range(t)]
                    mx = max(e)
                    a = [math.exp(v - mx) for v in e]
                    s = sum(a)
                    heads.append(sum(a[j] / s * xs[j][hh * dh : (hh + 1) * dh] for j in range(t)))
                out[bi, :, i, k] = m.mlp(torch.cat(heads)[None])[0]
    return out


def test_ltae_matches_the_per_pixel_reference_and_ignores_padded_dates():
    torch.manual_seed(0)
    m = LTAE(6, 5, n_head=2, d_k=3).eval()
    x = torch.randn(2, 4, 6, 3, 2)
    doy = torch.tensor([[10, 100, 200, 300], [5, 50, 0, 0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    with torch.no_grad():
        y = m(x, doy, valid)
        ref = _reference(m, x, doy, valid)
    assert y.shape == (2, 5, 3, 2)
    assert torch.allclose(y, ref, atol=1e-5)
    a = m.attention  # (B, heads, T, h, w): a distribution over the valid dates
    assert torch.allclose(a.sum(2), torch.ones(2, 2, 3, 2), atol=1e-6)
    assert a[1, :, 2:].abs().max() == 0
    x2 = x.clone()
    x2[1, 2:] = 99.0  # padded dates: anything there changes nothing
    with torch.no_grad():
        assert torch.allclose(m(x2, doy, valid), y)
        # the dates matter through the day-of-year encoding
        assert not torch.allclose(m(x, doy + 40, valid), y)


def test_doy_encoding_is_sinusoidal():
    e = doy_encoding(torch.tensor([0, 100]), 4, period=1000.0)
    assert e.shape == (2, 4)
    assert torch.allclose(e[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert e[1, 0] == pytest.approx(math.sin(100.0)) and e[1, 1] == pytest.approx(
        math.sin(100.0 / 1000**0.5), abs=1e-6
    )


def test_temporal_task_model_on_a_series():
    from test_downstream_standin import build_standin

    enc = build_standin("tiny")
    batch = {"s2": torch.randn(2, 3, 10, 16, 16), "s2_doy": torch.tensor([[1, 90, 200]] * 2),
             "s2_valid": torch.tensor([[True, True, False], [True, True, True]])}  # fmt: skip
    from skysense.tasks.downstream.model import probe_channels

    ch = probe_channels(enc, batch, "s2")
    model = TemporalTaskModel(enc, "segmentation", "s2", 3, ch, head_channels=8,
                              freeze_encoder=True)  # fmt: skip
    out = model(batch)["logits"]
    assert out.shape == (2, 3, 16, 16)
    out.sum().backward()
    assert all(m.query.grad is not None for m in model.ltae)
    assert all(p.grad is None for p in enc.parameters())  # frozen
    with pytest.raises(ValueError, match="L-TAE"):
        TemporalTaskModel(enc, "change", "s2", 2, ch)


def test_frozen_upernet_ltae_protocol_on_fake_pastis(tmp_path):
    """The benchmark protocol end to end (tiny encoder, a few steps) on PASTIS's layout; the
    fine-tuned file records the L-TAE and loads back as one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    import fakes

    from skysense.tasks.downstream.checkpoint import load_finetuned
    from tests.conftest import run_benchmark

    root = fakes.make("pastis", tmp_path / "pastis")
    out = tmp_path / "run"
    small = ["'trainer.max_steps=3'", "'trainer.batch_size=2'", "'task.eval.window=16'",
             "'task.eval.overlap=0'", "'data.crop=16'", "'task.features=s2'"]  # fmt: skip
    entry = ("{data: pastis, task: multimodal_segmentation, protocol: frozen_upernet_ltae, "
             f"eval_every: 1, patience: 1, val_fraction: 0.3, data_args: {{root: '{root}'}}, "
             f"overrides: [{','.join(small)}]}}")  # fmt: skip
    rec = run_benchmark(out, entry, "ltae", "seeds=[0]", "n_boot=100", "baselines=[]")["entries"][0]
    assert rec["status"] == "ok", rec
    run = rec["models"]["random init"]["runs"][0]
    assert "error" not in run, run.get("error")
    assert run["metric"] == "mIoU" and 0.0 <= run["score"] <= 1.0
    assert run["best_step"] in [e["step"] for e in run["val_curve"]]
    assert run["data_info"]["holdout"]["validation"] >= 1
    model, meta = load_finetuned(run["model"])
    assert meta["temporal"] == "ltae" and isinstance(model, TemporalTaskModel)

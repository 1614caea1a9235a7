"""The SkySense model on the tiny preset: outputs for every modality subset, padding
invariance, clear errors on bad input, gradients, checkpointing, other input sizes."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_batch

from skysense.encoders import build_skysense

pytestmark = pytest.mark.unit

SUBSETS = [s for n in (1, 2, 3) for s in itertools.combinations(("hr", "s2", "s1"), n)]


@pytest.mark.parametrize("mods", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_outputs_for_every_modality_subset(tiny, mods):
    B, T2, T1 = 2, 3, 2
    batch = make_batch(B, T2, T1, modalities=mods)
    with torch.no_grad():
        out = tiny(batch)
    cfg = tiny.cfg
    Cg, Df, D, h = cfg.grid_dim, cfg.fusion_dim, cfg.vit_dim, 4
    expected = {"fused", "geo", "region"}
    if "hr" in mods:
        expected |= {"hr_stages", "tokens_hr", "valid_hr"}
        stages = out["hr_stages"]
        assert [tuple(s.shape) for s in stages] == [
            (B, 32, 32, 32),
            (B, 64, 16, 16),
            (B, 128, 8, 8),
            (B, 256, 4, 4),
        ]
        assert out["tokens_hr"].shape == (B, 1, Cg, h, h)
        assert out["valid_hr"].dtype == torch.bool and out["valid_hr"].all()
        assert out["valid_hr"].shape == (B, 1)
        torch.testing.assert_close(out["tokens_hr"][:, 0], stages[-1])
    for m, T in (("s2", T2), ("s1", T1)):
        if m in mods:
            expected |= {f"{m}_taps", f"tokens_{m}", f"valid_{m}"}
            assert len(out[f"{m}_taps"]) == len(cfg.vit_taps)
            assert all(t.shape == (B, T, D, 4, 4) for t in out[f"{m}_taps"])
            assert out[f"tokens_{m}"].shape == (B, T, Cg, h, h)
            assert torch.equal(out[f"valid_{m}"], batch[f"{m}_valid"])
    assert set(out) == expected
    assert out["fused"].shape == (B, Df, h, h)
    assert out["geo"].shape == (B, 2 * Df, h, h)
    assert out["region"].shape == (B,) and out["region"].dtype == torch.int64
    for k, v in out.items():
        for t in v if isinstance(v, tuple) else (v,):
            if t.is_floating_point():
                assert t.dtype == torch.float32 and torch.isfinite(t).all(), k
    torch.testing.assert_close(out["geo"][:, :Df], out["fused"])
    # the last sample has no location: region -1, read-out zero; the first has one
    assert out["region"][-1] == -1 and (out["geo"][-1, Df:] == 0).all()
    assert out["region"][0] >= 0 and (out["geo"][0, Df:] != 0).any()


@pytest.mark.parametrize("mods", [("hr",), ("hr", "s2", "s1")], ids=["hr", "hr+s2+s1"])
def test_fuse_false_skips_fusion_and_geo_context(tiny, mods, monkeypatch):
    batch = make_batch(2, 3, 2, modalities=mods)
    with torch.no_grad():
        full = tiny(batch)

        def refuse(*a, **k):
            raise AssertionError("fusion or geo-context ran with fuse=False")

        monkeypatch.setattr(tiny.fusion, "forward", refuse)
        monkeypatch.setattr(tiny.geo_context, "forward", refuse)
        monkeypatch.setattr(tiny.geo_context, "region", refuse)
        spatial = tiny(batch, fuse=False)
    assert set(spatial) == set(full) - {"fused", "geo", "region"}
    for k, v in spatial.items():
        for a, b in zip(v, full[k]) if isinstance(v, tuple) else [(v, full[k])]:
            torch.testing.assert_close(a, b, msg=k)


def _pad_steps(batch, m, where, n=2, g=None):
    """Insert n padded steps (garbage pixels, doy 0, invalid) before index ``where``."""
    g = g or torch.Generator().manual_seed(7)
    b = dict(batch)
    x, d, v = batch[m], batch[f"{m}_doy"], batch[f"{m}_valid"]
    B = x.shape[0]
    junk = torch.randn(B, n, *x.shape[2:], generator=g) * 50
    b[m] = torch.cat([x[:, :where], junk, x[:, where:]], 1)
    b[f"{m}_doy"] = torch.cat([d[:, :where], torch.zeros(B, n, dtype=d.dtype), d[:, where:]], 1)
    b[f"{m}_valid"] = torch.cat(
        [v[:, :where], torch.zeros(B, n, dtype=torch.bool), v[:, where:]], 1
    )
    return b


def test_padded_steps_do_not_change_the_output(tiny):
    batch = make_batch(2, 3, 2)
    padded = _pad_steps(_pad_steps(batch, "s2", 3), "s1", 1)  # S2 at the end, S1 in between
    with torch.no_grad():
        a, b = tiny(batch), tiny(padded)
    for k in ("fused", "geo"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["tokens_s2"][:, :3], a["tokens_s2"])
    torch.testing.assert_close(b["tokens_s1"][:, [0, 3]], a["tokens_s1"])
    assert b["tokens_s2"].shape[1] == 5 and b["valid_s2"][:, 3:].sum() == 0


def test_validity_defaults_and_dtpe_modes():
    torch.manual_seed(0)
    m = build_skysense("tiny").eval()
    batch = make_batch(2, 2, 2)
    batch["s2_valid"][:] = True
    batch["s2_doy"][:] = torch.randint(1, 367, batch["s2_doy"].shape)
    no_valid = {k: v for k, v in batch.items() if k != "s2_valid"}
    with torch.no_grad():
        torch.testing.assert_close(m(no_valid)["fused"], m(batch)["fused"])
        # paper mode: dates of S1 and HR matter
        other = dict(batch, s1_doy=(batch["s1_doy"] % 300) + 5)
        assert not torch.allclose(m(other)["fused"], m(batch)["fused"])
        m.cfg = m.cfg.replace(dtpe_mode="s2")  # follow-up mode: only S2 dates matter
        torch.testing.assert_close(m(other)["fused"], m(batch)["fused"])
        no_hr_doy = {k: v for k, v in batch.items() if k != "hr_doy"}
        torch.testing.assert_close(m(no_hr_doy)["fused"], m(batch)["fused"])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda b: b.update(s2=b["s2"][:, :, :4]),
            r"s2: expected \(B, T, 10, hs, ws\).*got \(2, 3, 4, 16, 16\)",
        ),
        (
            lambda b: b.update(s1=b["s1"][:, :, :1]),
            r"s1: expected \(B, T, 2, hs, ws\).*VV VH.*got \(2, 2, 1, 16, 16\)",
        ),
        (
            lambda b: b.update(hr=b["hr"][:, :2]),
            r"hr: expected \(B, 3, H, W\).*got \(2, 2, 128, 128\)",
        ),
        (
            lambda b: b.update(hr=b["hr"][..., :96, :96]),
            r"s2: spatial size does not align with hr.*3 x 3.*4 x 4.*12 x 12 px",
        ),
        (
            lambda b: b.update(s1=b["s1"][..., :8, :8]),
            r"s1: tiles of 8 x 8 px do not match s2's 16 x 16",
        ),
        (
            lambda b: b["s2_doy"].__setitem__((1, 2), 367),
            r"s2_doy: day of year must be in 1\.\.366.*\(1, 2\) has 367",
        ),
        (lambda b: b["s1_doy"].__setitem__((0, 0), -3), r"s1_doy: day of year.*-3"),
        (
            lambda b: b.update(s2_doy=b["s2_doy"].float()),
            r"s2_doy: expected an integer day of year",
        ),
        (lambda b: b.update(s2_valid=b["s2_valid"][:, :2]), r"s2_valid: expected \(2, 3\) bool"),
        (lambda b: b.update(hr=b["hr"][..., :100]), r"hr: H and W must be multiples of 32"),
        (lambda b: b.update(s2=b["s2"][:1]), r"s2: batch size 1 differs from hr's 2"),
        (
            lambda b: b.update(latlon=torch.tensor([[95.0, 0.0], [0.0, 0.0]])),
            r"latlon: latitude must be in -90\.\.90",
        ),
        (lambda b: [b.pop(k) for k in ("hr", "s2", "s1")], r"none of the modalities"),
    ],
)
def test_bad_input_is_a_clear_error(tiny, change, message):
    batch = make_batch(2, 3, 2)
    change(batch)
    with pytest.raises(ValueError, match=message):
        tiny(batch)


def test_model_built_without_a_modality_says_so():
    m = build_skysense("tiny", modalities=("s2",))
    assert m.hr_encoder is None and m.s1_encoder is None
    with pytest.raises(ValueError, match=r"has \['hr'\] but the model was built with"):
        m(make_batch(1, 2, 2, modalities=("hr", "s2")))


def test_gradients_reach_every_learned_parameter_but_not_the_prototypes():
    torch.manual_seed(0)
    m = build_skysense("tiny").train()
    out = m(make_batch(2, 3, 2))
    loss = sum(
        (t.float() * torch.randn_like(t.float())).sum()
        for k, v in out.items()
        if k != "region" and not k.startswith("valid")
        for t in (v if isinstance(v, tuple) else (v,))
    )
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert m.geo_context.prototypes.grad is None
    assert not m.geo_context.prototypes.requires_grad
    assert "geo_context.prototypes" not in dict(m.named_parameters())
    assert "geo_context.prototypes" in m.state_dict()


def test_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    a = build_skysense("tiny", fusion_drop_path_rate=0.0).train()
    b = build_skysense("tiny", fusion_drop_path_rate=0.0, checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    assert b.fusion.checkpointing and b.s2_encoder.checkpointing
    assert all(s.checkpointing for s in b.hr_encoder.stages)
    batch = make_batch(2, 2, 2)
    grads = []
    for m in (a, b):
        out = m(batch)
        (out["geo"].square().sum() + sum(s.sum() for s in out["hr_stages"])).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_other_input_sizes_that_keep_the_grids_aligned(tiny):
    batch = make_batch(1, 2, 1, hr=256, s=32)  # 8 x 8 fusion grid
    batch["hr"] = batch["hr"][..., :, :192]  # and rectangular: 8 x 6
    for m in ("s2", "s1"):
        batch[m] = batch[m][..., :, :24]
    with torch.no_grad():
        out = tiny(batch)
    assert out["fused"].shape == (1, 64, 8, 6)
    assert out["tokens_s2"].shape == (1, 2, 256, 8, 6)
    assert out["hr_stages"][0].shape == (1, 32, 64, 48)


def test_bfloat16_autocast_forward_backward():
    torch.manual_seed(0)
    m = build_skysense("tiny").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(make_batch(2, 3, 2))
    outs = [
        t
        for k, v in out.items()
        if k != "region" and not k.startswith("valid")
        for t in (v if isinstance(v, tuple) else (v,))
    ]
    assert all(torch.isfinite(t.float()).all() for t in outs)
    sum(t.float().square().mean() for t in outs).backward()
    assert all(p.grad is not None for p in m.parameters())

"""Presets: parameter counts on the meta device (huge within 2 % of the paper), geometry
validation, overrides."""

from __future__ import annotations

import pytest
import torch

from skysense.encoders import (
    PAPER_PARAMETER_COUNTS,
    PRESETS,
    SkySenseConfig,
    build_skysense,
    count_parameters,
    preset_config,
)

pytestmark = pytest.mark.unit


def _meta(preset, **kw):
    with torch.device("meta"):
        return build_skysense(preset, **kw)


def test_huge_matches_the_paper_within_two_percent():
    counts = count_parameters(_meta("huge"))
    for part, paper in PAPER_PARAMETER_COUNTS.items():
        assert abs(counts[part] / paper - 1) < 0.02, (part, counts[part], paper)
    assert counts["geo_prototypes"] == 4096 * 100 * 1024


def test_huge_is_the_paper_architecture():
    m = _meta("huge")
    cfg = m.cfg
    assert m.hr_encoder.dims == (352, 704, 1408, 2816)
    assert cfg.grid_dim == 2816 and cfg.fusion_dim == 1024 and cfg.fusion_depth == 24
    assert len(m.s2_encoder.blocks) == 24 and m.s2_encoder.taps == (5, 11, 17, 23)
    assert m.s2_encoder.patch_embed.weight.shape == (1024, 10, 4, 4)
    assert m.s1_encoder.patch_embed.weight.shape == (1024, 2, 4, 4)
    assert m.grid_s2.proj.weight.shape == (16 * 2816, 1024, 1, 1)
    assert m.fusion.dtpe.table.shape == (365, 2816)
    assert m.fusion.blocks[0].mlp.fc1.weight.shape == (4096, 1024)
    assert m.fusion.blocks[-1].drop_path.p == pytest.approx(0.3)
    assert m.geo_context.prototypes.shape == (4096, 100, 1024)
    assert cfg.hr_img_size // cfg.hr_stride == 64


def test_large_uses_swin_v2_large():
    counts = count_parameters(_meta("large"))
    assert abs(counts["hr_encoder"] / 197e6 - 1) < 0.02


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_grows(preset):
    counts = count_parameters(_meta(preset))
    assert counts["total"] > 0
    assert preset_config(preset).name == preset


def test_sizes_grow_with_the_preset():
    totals = [
        count_parameters(_meta(p))["total"] for p in ("tiny", "small", "base", "large", "huge")
    ]
    assert totals == sorted(totals)
    assert 1e6 < totals[0] < 3e6  # tiny stays fast on two CPU cores


def test_misaligned_geometry_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"grids do not align: HR 128 / 32.*= 4.*S 16 / patch 4 x upscale 2 = 8"
    ):
        preset_config("tiny", grid_upscale=2)
    with pytest.raises(ValueError, match="unknown field"):
        build_skysense("tiny", fusion_layers=3)
    with pytest.raises(ValueError, match="unknown SkySense preset 'giant'"):
        build_skysense("giant")
    with pytest.raises(ValueError, match="fusion_depth must be at least 1"):
        preset_config("tiny", fusion_depth=0)
    with pytest.raises(ValueError, match="dtpe_mode"):
        preset_config("tiny", dtpe_mode="hr")


def test_overrides_accept_lists_as_hydra_gives_them():
    cfg = preset_config("tiny", swin_depths=[1, 1, 1, 1], vit_taps=[3], modalities=["s2", "s1"])
    assert cfg.swin_depths == (1, 1, 1, 1) and cfg.vit_taps == (3,)
    assert cfg.modalities == ("s2", "s1")
    assert isinstance(cfg, SkySenseConfig)
    m = build_skysense("tiny", fusion_depth=1, modalities=("s2",))
    assert len(m.fusion.blocks) == 1 and m.hr_encoder is None

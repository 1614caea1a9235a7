"""checkpoint_filter_fn on a synthetic "released" state dict: our model's keys renamed to the
release's names by an independent table (the reverse of the documented mapping)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from skysense.encoders import build_skysense, checkpoint_filter_fn, map_released_keys
from skysense.encoders.checkpoint_filter import match_to_model, release_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from refutil import load_manifest, meta_release  # noqa: E402

pytestmark = pytest.mark.unit

# ours -> released, written from the release's module names (not from the filter's rules)
TO_RELEASED = [
    (r"^hr_encoder\.patch_embed\.proj\.", "backbone_gep.patch_embed.projection."),
    (r"^hr_encoder\.out_norms\.(\d)\.", r"backbone_gep.norm\1."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.attn\.", r"backbone_gep.\1.attn.w_msa."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.mlp\.fc1\.", r"backbone_gep.\1.ffn.layers.0.0."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.mlp\.fc2\.", r"backbone_gep.\1.ffn.layers.1."),
    (r"^hr_encoder\.", "backbone_gep."),
    (r"^(s[12])_encoder\.patch_embed\.", r"backbone_\1.patch_embed.projection."),
    (r"^(s[12])_encoder\.norm\.", r"backbone_\1.ln1."),
    (r"^(s[12])_encoder\.blocks\.(\d+)\.norm(\d)\.", r"backbone_\1.layers.\2.ln\3."),
    (
        r"^(s[12])_encoder\.blocks\.(\d+)\.attn\.qkv\.weight",
        r"backbone_\1.layers.\2.attn.attn.in_proj_weight",
    ),
    (
        r"^(s[12])_encoder\.blocks\.(\d+)\.attn\.qkv\.bias",
        r"backbone_\1.layers.\2.attn.attn.in_proj_bias",
    ),
    (
        r"^(s[12])_encoder\.blocks\.(\d+)\.attn\.proj\.",
        r"backbone_\1.layers.\2.attn.attn.out_proj.",
    ),
    (r"^(s[12])_encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone_\1.layers.\2.ffn.layers.0.0."),
    (r"^(s[12])_encoder\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone_\1.layers.\2.ffn.layers.1."),
    (r"^(s[12])_encoder\.", r"backbone_\1."),
    (r"^grid_(s[12])\.proj\.", r"head_\1.decoder.0."),
    (r"^fusion\.proj\.", "fusion.porj_linear."),
    (r"^fusion\.extra_token$", "fusion.cls_token"),
    (r"^fusion\.blocks\.(\d+)\.norm(\d)\.", r"fusion.layers.\1.ln\2."),
    (r"^fusion\.blocks\.(\d+)\.attn\.qkv\.weight", r"fusion.layers.\1.attn.attn.in_proj_weight"),
    (r"^fusion\.blocks\.(\d+)\.attn\.qkv\.bias", r"fusion.layers.\1.attn.attn.in_proj_bias"),
    (r"^fusion\.blocks\.(\d+)\.attn\.proj\.", r"fusion.layers.\1.attn.attn.out_proj."),
    (r"^fusion\.blocks\.(\d+)\.mlp\.fc1\.", r"fusion.layers.\1.ffn.layers.0.0."),
    (r"^fusion\.blocks\.(\d+)\.mlp\.fc2\.", r"fusion.layers.\1.ffn.layers.1."),
]


def _released(model) -> dict:
    sd = {}
    for k, v in model.state_dict().items():
        if k == "geo_context.prototypes":
            continue  # not part of the released backbone files
        if k == "fusion.dtpe.table":
            sd["ctpe"] = v[None].clone()
            continue
        if k.endswith("downsample.reduction.weight"):
            # the release gathers 2 x 2 patches channel-major (nn.Unfold): column c*4 + r*2 + col
            out, four_c = v.shape
            v = v.reshape(out, 4, four_c // 4).transpose(1, 2).reshape(out, four_c)
        for pat, rep in TO_RELEASED:
            new, n = re.subn(pat, rep, k)
            if n:
                sd[new] = v.clone()
                break
        else:
            raise AssertionError(f"test table misses {k}")
    return sd


def test_released_names_map_back_onto_the_model(caplog):
    torch.manual_seed(0)
    src = build_skysense("tiny")
    released = _released(src)
    assert "backbone_gep.stages.2.blocks.1.attn.w_msa.cpb_mlp.2.weight" in released
    assert "backbone_s2.layers.3.attn.attn.in_proj_weight" in released
    assert released["ctpe"].shape == (1, 365, 256)
    # things the release has that we recompute or do not have
    released["backbone_gep.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(1)
    released["backbone_gep.stages.0.blocks.0.attn.w_msa.relative_coords_table"] = torch.zeros(1)
    released["head_gep.mlp.0.weight"] = torch.zeros(3)
    released["head.last_layer.weight"] = torch.zeros(3)
    wrapped = {"state_dict": {"module." + k: v for k, v in released.items()}}

    with caplog.at_level(logging.WARNING, logger="skysense.encoders.checkpoint_filter"):
        sd = checkpoint_filter_fn(wrapped, model=src)
    assert "head_gep.mlp.0.weight" in caplog.text and "head.last_layer.weight" in caplog.text

    dst = build_skysense("tiny")
    result = dst.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == ["geo_context.prototypes"]
    for k, v in src.state_dict().items():
        if k != "geo_context.prototypes":
            assert torch.equal(dst.state_dict()[k], v), k

    _, unmapped, dropped = map_released_keys(released)
    assert sorted(unmapped) == ["head.last_layer.weight", "head_gep.mlp.0.weight"]
    assert len(dropped) == 2


def test_pos_embed_is_resized_to_the_model_grid():
    src = build_skysense("tiny", s_img_size=32, hr_img_size=256)  # 8 x 8 ViT grid
    dst = build_skysense("tiny")  # 4 x 4
    sd = checkpoint_filter_fn(_released(src), model=dst)
    assert sd["s2_encoder.pos_embed"].shape == dst.s2_encoder.pos_embed.shape
    torch.testing.assert_close(  # the class token's row is kept as it is
        sd["s2_encoder.pos_embed"][:, 0], src.s2_encoder.pos_embed[:, 0].detach()
    )


def test_our_own_names_pass_through():
    m = build_skysense("tiny")
    sd = checkpoint_filter_fn(m.state_dict())
    assert set(sd) == set(m.state_dict())


# --- the release's exact names and shapes (tests/reference/fixtures/released_keys.json, built
# from the OpenMMLab reference code by the reference tier) -------------------------------------

RELEASE_FIELDS = dict(vit_cls_token=False, vit_final_norm=False, fusion_norm_eps=1e-5)


def _meta_release(size: str) -> dict:
    return meta_release(load_manifest()[size]["keys"])


@pytest.fixture(scope="module")
def huge_meta():
    with torch.device("meta"):
        return build_skysense("huge", **RELEASE_FIELDS)


def test_paper_size_release_maps_strictly(huge_meta):
    release = _meta_release("huge")
    assert len(release) == 1363
    mapped, report = match_to_model(release, huge_meta)
    assert report.ok, report.table()
    assert report.absent == []
    assert "48 Swin V2 buffers recomputed here"  # 24 blocks x 2 in report.dropped[0]
    assert set(huge_meta.state_dict()) - set(mapped) == {"geo_context.prototypes"}


def test_every_released_name_round_trips():
    """release_name (used in messages) inverts the mapping on every key of the manifest."""
    release = _meta_release("huge")
    n = 0
    for key, value in release.items():
        mapped, _, dropped = map_released_keys({key: value})
        for ours in mapped:
            assert release_name(ours) == key
            n += 1
    assert n == len(release) - 48


@pytest.mark.parametrize(
    "key",
    [
        "backbone_gep.stages.2.blocks.17.norm3.bias",
        "backbone_s1.layers.7.attn.attn.out_proj.weight",
        "fusion.porj_linear.bias",
        "ctpe",
    ],
)
def test_a_removed_or_renamed_key_is_named(huge_meta, key):
    release = _meta_release("huge")
    value = release.pop(key)
    _, report = match_to_model(release, huge_meta)
    assert not report.ok and report.unexpected == []
    assert len(report.missing) == 1  # in our terms (fusion.proj.bias for porj_linear) ...
    assert release_name(report.missing[0]) == key
    assert report.missing[0] in report.error("release.pth")
    assert f"(release: {key})" in report.error("release.pth")  # ... and in the release's

    release[key.replace("layers", "layer").replace("norm3", "norm_3") + "_x"] = value
    _, report = match_to_model(release, huge_meta)
    assert len(report.missing) == 1 and len(report.unexpected) == 1
    assert report.unexpected[0].endswith("_x")
    assert report.unexpected[0] in report.error("release.pth")


def test_parts_absent_from_a_release_are_reported_not_missing(huge_meta):
    release = {k: v for k, v in _meta_release("huge").items() if k.startswith("backbone_s2.")}
    _, report = match_to_model(release, huge_meta)
    assert report.ok
    assert report.absent == ["hr_encoder", "s1_encoder", "grid_s2", "grid_s1", "fusion"]
    with torch.device("meta"):
        s1_only = build_skysense("huge", modalities=("s1",), **RELEASE_FIELDS)
    _, report = match_to_model(release, s1_only)
    assert report.ok and report.skipped and all(k.startswith("s2_") for k in report.skipped)


def test_build_skysense_reads_a_released_pth_strictly(tmp_path):
    sd = _released(build_skysense("tiny"))
    torch.save({"state_dict": sd}, tmp_path / "release.pth")
    m = build_skysense("tiny", weights=tmp_path / "release.pth")
    assert torch.equal(m.s2_encoder.pos_embed, sd["backbone_s2.pos_embed"])
    del sd["backbone_gep.patch_embed.norm.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*hr_encoder\.patch_embed\.norm\.weight"):
        build_skysense("tiny", weights=tmp_path / "broken.pth")
    m = build_skysense("tiny", weights=tmp_path / "broken.pth", strict=False)
    assert torch.equal(m.fusion.dtpe.table, sd["ctpe"][0])

"""`skysense convert SRC... DST` on synthetic releases made from the key manifest
(tests/reference/fixtures/released_keys.json, the reference code's exact names; the tiny sizes,
random tensors), and the folders it writes read by build_skysense(weights=...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from skysense.encoders import build_skysense
from skysense.encoders.weights import load_weights, verify_weights
from skysense.tasks.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from refutil import load_manifest, small_release  # noqa: E402

pytestmark = pytest.mark.unit
# The manifest's tiny sizes are the tiny preset's, but mmpretrain's Swin V2 has a 512-wide
# position-bias MLP (the tiny preset: 64).
TINY = ["model=tiny", "+model.overrides.swin_cpb_hidden=512"]
BACKBONES = ("backbone_gep", "backbone_s2", "backbone_s1")


@pytest.fixture(scope="module")
def release():
    return small_release(load_manifest()["tiny"]["keys"], seed=3)


def _per_module_files(release: dict, folder: Path, prefixes=BACKBONES) -> list[str]:
    paths = []
    for p in prefixes:
        sd = {k[len(p) + 1 :]: v for k, v in release.items() if k.startswith(p + ".")}
        path = folder / f"skysense_model_{p}.pth"
        torch.save({"state_dict": sd}, path)
        paths.append(str(path))
    return paths


def test_combined_release_converts_and_loads_strictly(tmp_path, release, capsys):
    torch.save({"state_dict": release}, tmp_path / "release.pth")
    assert main(["convert", str(tmp_path / "release.pth"), str(tmp_path / "w"), *TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["absent"] == []
    folder = tmp_path / "w"
    assert sorted(p.name for p in folder.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "model.safetensors",
    ]
    verify_weights(folder)
    _, config = load_weights(folder)
    assert config["preset"] == "tiny"
    assert config["model"]["vit_cls_token"] is False and config["model"]["vit_final_norm"] is False
    assert config["sensors"]["s2"]["bands"][:3] == ["B2", "B3", "B4"]
    assert len(config["sensors"]["s2"]["mean"]) == 10
    src = config["sources"][0]
    assert src["file"] == "release.pth" and len(src["sha256"]) == 64

    model = build_skysense("tiny", weights=folder)  # strict: every key of every part
    assert model.cfg.swin_cpb_hidden == 512 and model.cfg.fusion_norm_eps == 1e-5
    # values arrive where they belong (the class token's position row is dropped)
    torch.testing.assert_close(
        model.s2_encoder.pos_embed, release["backbone_s2.pos_embed"][:, 1:], rtol=0, atol=0
    )
    torch.testing.assert_close(model.fusion.dtpe.table, release["ctpe"][0], rtol=0, atol=0)
    torch.testing.assert_close(
        model.fusion.proj.weight, release["fusion.porj_linear.weight"], rtol=0, atol=0
    )


def test_three_backbone_files_convert_with_the_rest_absent(tmp_path, release, capsys):
    paths = _per_module_files(release, tmp_path)
    assert main(["convert", *paths, str(tmp_path / "w"), *TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parts"] == ["hr_encoder", "s1_encoder", "s2_encoder"]
    assert out["absent"] == ["grid_s2", "grid_s1", "fusion"]
    _, config = load_weights(tmp_path / "w")
    assert [s["file"] for s in config["sources"]] == [Path(p).name for p in paths]
    model = build_skysense("tiny", weights=tmp_path / "w")
    torch.testing.assert_close(
        model.s1_encoder.blocks[2].attn.qkv.weight,
        release["backbone_s1.layers.2.attn.attn.in_proj_weight"],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_removed_or_renamed_key_fails_naming_it(tmp_path, release, capsys, how):
    key = "backbone_s2.layers.1.ffn.layers.0.0.weight"
    broken = dict(release)
    value = broken.pop(key)
    if how == "renamed":
        broken["backbone_s2.layers.1.ffn.layer.0.0.weight"] = value
    torch.save(broken, tmp_path / "release.pth")
    args = ["convert", str(tmp_path / "release.pth"), str(tmp_path / "w"), *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert key in err  # the missing key, in the release's name (and ours)
    assert "s2_encoder.blocks.1.mlp.fc1.weight" in err
    if how == "renamed":
        assert "backbone_s2.layers.1.ffn.layer.0.0.weight" in err  # the unexpected one
    assert not (tmp_path / "w").exists()

    assert main([*args, "strict=false"]) == 0
    captured = capsys.readouterr().out
    assert "missing" in captured and "s2_encoder.blocks.1.mlp.fc1.weight" in captured
    _, config = load_weights(tmp_path / "w")
    assert config["converted"]["missing"] == ["s2_encoder.blocks.1.mlp.fc1.weight"]


def test_a_file_without_prefix_or_telling_name_is_refused(tmp_path, release, capsys):
    sd = {k[len("backbone_s2.") :]: v for k, v in release.items() if k.startswith("backbone_s2.")}
    torch.save(sd, tmp_path / "weights.pth")
    assert main(["convert", str(tmp_path / "weights.pth"), str(tmp_path / "w"), *TINY]) == 2
    assert "carry no module prefix" in capsys.readouterr().err


def test_convert_needs_dst(tmp_path, release, capsys):
    torch.save(release, tmp_path / "release.pth")
    assert main(["convert", str(tmp_path / "release.pth"), *TINY]) == 2
    assert "dst" in capsys.readouterr().err

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

    # the release's Swin windows (mmpretrain: padding attended to, no shift at window-sized
    # sides) are recorded, so a model built from the folder behaves like the release
    assert config["model"]["swin_window_mode"] == "release"

    model = build_skysense("tiny", weights=folder)  # strict: every key of every part
    assert model.cfg.swin_cpb_hidden == 512 and model.cfg.fusion_norm_eps == 1e-5
    assert model.cfg.swin_window_mode == "release"
    assert {b.attn.mode for st in model.hr_encoder.stages for b in st.blocks} == {"release"}
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


def test_the_window_mode_is_a_choice_and_a_fine_tune_keeps_it(tmp_path, release, capsys):
    """`release.swin_window_mode=masked` converts for the default windows instead; a weights
    folder's window mode reaches build_encoder's recorded overrides (a fine-tuned model file
    rebuilds it), and the two folders' models differ where the window does not tile a map."""
    from skysense.tasks.downstream.checkpoint import build_encoder

    torch.save({"state_dict": release}, tmp_path / "release.pth")
    src = str(tmp_path / "release.pth")
    assert main(["convert", src, str(tmp_path / "rel"), *TINY]) == 0
    assert (
        main(["convert", src, str(tmp_path / "msk"), *TINY, "release.swin_window_mode=masked"]) == 0
    )
    capsys.readouterr()
    assert load_weights(tmp_path / "msk")[1]["model"]["swin_window_mode"] == "masked"
    enc, info = build_encoder("tiny", {}, tmp_path / "rel")
    assert info["overrides"]["swin_window_mode"] == "release"
    assert enc.cfg.swin_window_mode == "release"
    masked, info = build_encoder("tiny", {}, tmp_path / "msk")
    assert "swin_window_mode" not in info["overrides"]  # the preset's default
    x = torch.randn(1, 3, 96, 160)  # stage maps 24x40 .. 3x5: 3 and 5 are not multiples of 4
    with torch.no_grad():
        a = enc.hr_encoder.eval()(x)
        b = masked.hr_encoder.eval()(x)
    assert torch.equal(a[0], b[0])  # 24 x 40 tokens: tiled by window 4, no difference
    assert float((a[3] - b[3]).abs().max()) > 1e-3


def test_build_encoder_builds_the_folders_preset_with_a_warning(tmp_path, release, capsys, caplog):
    """A weights folder written for another preset than asked: its own preset is built (as a
    pre-training checkpoint's is), with a warning, instead of an error."""
    from skysense.tasks.downstream.checkpoint import build_encoder

    torch.save({"state_dict": release}, tmp_path / "release.pth")
    assert main(["convert", str(tmp_path / "release.pth"), str(tmp_path / "w"), *TINY]) == 0
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="skysense.tasks.downstream.checkpoint"):
        enc, info = build_encoder("small", {}, tmp_path / "w")
    assert info["preset"] == "tiny" and enc.cfg.swin_embed_dim == 32
    assert "holds preset 'tiny'; building that (not 'small')" in caplog.text
    state, _ = load_weights(tmp_path / "w")
    own = enc.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


# --- round trips: export format=safetensors, convert, load ---------------------------------

RELEASE_STRUCTURE = dict(
    vit_cls_token=False,
    vit_final_norm=False,
    fusion_norm_eps=1e-5,
    swin_cpb_hidden=512,
    swin_window_mode="release",
)


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hr": torch.randn(1, 3, 128, 128, generator=g),
        "s2": torch.randn(1, 2, 10, 16, 16, generator=g),
        "s2_doy": torch.tensor([[40, 200]]),
        "s1": torch.randn(1, 2, 2, 16, 16, generator=g),
        "s1_doy": torch.tensor([[41, 201]]),
    }


def _outputs(model) -> dict:
    with torch.no_grad():
        out = model.eval()(_batch())
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_export_then_convert_then_load_gives_identical_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_skysense("tiny", **RELEASE_STRUCTURE)
    want = _outputs(model)
    ckpt = {
        "teacher": model.state_dict(),
        "student": model.state_dict(),
        "config": {"model": {"preset": "tiny", "overrides": RELEASE_STRUCTURE}},
    }
    torch.save(ckpt, tmp_path / "pretrain.pt")
    args = ["export", f"checkpoint={tmp_path / 'pretrain.pt'}", f"out={tmp_path / 'exp'}"]
    assert main([*args, "format=safetensors"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == ["SHA256SUMS", "config.json", "model.safetensors"]
    assert load_weights(tmp_path / "exp")[1]["sensors"]["s1"]["bands"] == ["VV", "VH"]
    _assert_identical(_outputs(build_skysense("tiny", weights=tmp_path / "exp")), want)

    # the same weights under the release's names, converted: identical again
    from skysense.encoders.checkpoint_filter import to_release

    torch.save({"state_dict": to_release(model.state_dict())}, tmp_path / "release.pth")
    conv = ["convert", str(tmp_path / "release.pth"), str(tmp_path / "conv"), *TINY]
    assert main(conv) == 0
    capsys.readouterr()
    loaded = build_skysense("tiny", weights=tmp_path / "conv")
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():  # the prototypes are pre-training state, not in a release
        loaded.geo_context.prototypes.copy_(model.geo_context.prototypes)
    _assert_identical(_outputs(loaded), want)


def test_a_corrupted_weights_folder_is_refused(tmp_path, capsys):
    model = build_skysense("tiny")
    torch.save(
        {"teacher": model.state_dict(), "config": {"model": {"preset": "tiny"}}}, tmp_path / "p.pt"
    )
    assert (
        main(
            [
                "export",
                f"checkpoint={tmp_path / 'p.pt'}",
                f"out={tmp_path / 'w'}",
                "format=safetensors",
            ]
        )
        == 0
    )
    data = bytearray((tmp_path / "w" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "w" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match SHA256SUMS"):
        build_skysense("tiny", weights=tmp_path / "w")


@pytest.mark.slow
def test_huggingface_mixin_reads_the_folder_offline(tmp_path, capsys, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from skysense.encoders.hub import SkySenseHub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = build_skysense("tiny", vit_final_norm=False)
    torch.save(
        {
            "teacher": model.state_dict(),
            "config": {"model": {"preset": "tiny", "overrides": {"vit_final_norm": False}}},
        },
        tmp_path / "p.pt",
    )
    assert (
        main(
            [
                "export",
                f"checkpoint={tmp_path / 'p.pt'}",
                f"out={tmp_path / 'w'}",
                "format=safetensors",
            ]
        )
        == 0
    )
    capsys.readouterr()
    hub = SkySenseHub.from_pretrained(str(tmp_path / "w"))
    assert hub.cfg.vit_final_norm is False
    _assert_identical(_outputs(hub), _outputs(model))


@pytest.mark.slow
def test_a_finetuned_model_exports_whole_and_its_encoder_loads(tmp_path, capsys):
    from skysense.tasks.downstream.checkpoint import save_finetuned
    from skysense.tasks.downstream.model import build_task_model

    torch.manual_seed(0)
    enc = build_skysense("tiny")
    model = build_task_model(
        enc, "segmentation", "hr", 3, {"hr": torch.randn(1, 3, 64, 64)}, head_channels=8
    )
    meta = {"preset": "tiny", "overrides": {}, "kind": "segmentation", "source": "hr"}
    save_finetuned(tmp_path / "model.pt", model, {**meta, "n_classes": 3})
    out = tmp_path / "w"
    args = ["export", f"checkpoint={tmp_path / 'model.pt'}", f"out={out}", "format=safetensors"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "segmentation"
    state, config = load_weights(out)
    assert config["encoder_prefix"] == "encoder." and config["finetuned"]["n_classes"] == 3
    assert set(state) == set(model.state_dict())  # the head too
    _assert_identical(_outputs(build_skysense("tiny", weights=out)), _outputs(enc))


def test_export_detection_program_is_a_one_line_error(capsys):
    assert main(["export", "head.kind=detection", "onnx=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skysense export: head.kind: detection cannot be exported")
    assert "\n" not in err


@pytest.mark.slow
def test_released_files_to_a_finetuned_segmentation_model(tmp_path, release, capsys):
    """The README's path on the tiny sizes: released backbone files -> convert -> finetune
    (segmentation on GeoTIFF masks, encoder frozen) -> a model file whose encoder is the
    release's, exactly."""
    import numpy as np
    from test_downstream_finetune import _cfg, _hr_scene

    from skysense.tasks.downstream.checkpoint import load_finetuned
    from skysense.tasks.downstream.run import finetune

    paths = _per_module_files(release, tmp_path)  # unprefixed keys, module in the file name
    renamed = tmp_path / "skysense_model_backbone_hr.pth"  # SkySense++'s name of the HR file
    Path(paths[0]).rename(renamed)
    assert main(["convert", str(renamed), *paths[1:], str(tmp_path / "w"), *TINY]) == 0
    capsys.readouterr()
    rng = np.random.default_rng(0)
    scenes = [_hr_scene(tmp_path, f"t{i}", rng) for i in range(3)]
    cfg = _cfg(
        [
            "task=segmentation",
            "model=tiny",
            f"checkpoint={tmp_path / 'w'}",
            f"run_dir={tmp_path / 'run'}",
            f"data.root={tmp_path}",
            "data.crop=64",
            "data.classes=[background,square]",
            "data.label_values={1: 0, 2: 1}",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "task.freeze_encoder=true",
            "task.eval.window=64",
            "task.head.channels=8",
        ]
    )
    cfg.data.train_scenes = scenes[:2]
    cfg.data.val_scenes = scenes[2:]
    summary = finetune(cfg)
    assert "pretrained" in summary["table"]
    model, meta = load_finetuned(tmp_path / "run" / "pretrained" / "model.pt")
    assert meta["kind"] == "segmentation"
    state, _ = load_weights(tmp_path / "w")
    own = model.encoder.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k

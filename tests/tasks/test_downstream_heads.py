"""Heads, task models, layer-wise lr decay and checkpoint loading, on the contract stand-in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_downstream_standin import StandInSkySense, build_standin, make_batch

import skysense.encoders
from skysense.tasks.downstream import checkpoint as ckpt
from skysense.tasks.downstream.heads import (
    ChangeHead,
    ClassificationHead,
    SimplePyramid,
    UperNetHead,
)
from skysense.tasks.downstream.model import TaskModel, build_task_model
from skysense.tasks.training import optim
from skysense.tasks.training.checkpoint import CheckpointError

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _upernet_reference(head: UperNetHead, feats):
    """UperNet written out step by step with the head's own modules, float64."""

    def cna(m, x):  # ConvNormAct
        return m(x)

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    top = feats[-1]
    pooled = [top]
    for s, br in zip(head.ppm.scales, head.ppm.branches):
        pooled.append(up(cna(br, F.adaptive_avg_pool2d(top, s)), top.shape[-2:]))
    p = [cna(head.ppm.bottleneck, torch.cat(pooled, 1))]
    lat = [cna(m, f) for m, f in zip(head.lateral, feats[:-1])]
    # top-down, coarse to fine
    merged = [None] * len(feats)
    merged[-1] = p[0]
    for i in range(len(feats) - 2, -1, -1):
        merged[i] = lat[i] + up(merged[i + 1], lat[i].shape[-2:])
    outs = [cna(head.fpn[i], merged[i]) for i in range(len(feats) - 1)] + [merged[-1]]
    size = outs[0].shape[-2:]
    cat = torch.cat([outs[0]] + [up(o, size) for o in outs[1:]], 1)
    return head.cls(cna(head.fuse, cat))


@pytest.mark.parametrize("sizes", [(16, 8, 4, 2), (15, 8, 4, 2), (9, 5, 3, 1)])
def test_upernet_matches_step_by_step_reference(sizes):
    chans = [5, 7, 9, 11]
    head = UperNetHead(chans, 16, 3, dropout=0.0).double().eval()
    feats = [torch.randn(2, c, s, s + 1, dtype=torch.float64) for c, s in zip(chans, sizes)]
    out = head(feats)
    assert out.shape == (2, 3, sizes[0], sizes[0] + 1)
    torch.testing.assert_close(out, _upernet_reference(head, feats))


def test_upernet_rejects_wrong_levels():
    head = UperNetHead([4, 8], 8, 2)
    with pytest.raises(ValueError, match="level 1: expected"):
        head([torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)])
    with pytest.raises(ValueError, match="2 levels, got 1"):
        head([torch.randn(1, 4, 8, 8)])


@pytest.mark.parametrize("grid", [4, 5, 7])
def test_simple_pyramid_shapes_at_odd_grids(grid):
    neck = SimplePyramid([12] * 4, 8)
    maps = [torch.randn(2, 12, grid, grid) for _ in range(4)]
    out = neck(maps)
    assert [tuple(o.shape[-2:]) for o in out] == [
        (2 * grid, 2 * grid),
        (grid, grid),
        (-(-grid // 2),) * 2,
        (-(-grid // 4),) * 2,
    ]
    single = SimplePyramid([12], 8)
    assert len(single(maps[:1])) == 4


def test_change_head_sees_the_difference():
    head = ChangeHead([6, 6], 8, 2, dropout=0.0).eval()
    f = [torch.randn(1, 6, 8, 8), torch.randn(1, 6, 4, 4)]
    g = [x + 1.0 for x in f]
    assert not torch.allclose(head(f, f), head(f, g))
    with pytest.raises(ValueError, match="same pixels"):
        head(f, [f[0][..., :4], f[1]])


def test_classification_head_checks_width():
    head = ClassificationHead(16, 5)
    assert head(torch.randn(3, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        head(torch.randn(3, 8))


@pytest.mark.parametrize(
    "kind,source,mods",
    [
        ("classification", "hr", ("hr",)),
        ("multilabel", "s2", ("s2",)),
        ("multilabel", "fused", ("s2", "s1")),
        ("classification", "geo", ("hr", "s2", "s1")),
        ("segmentation", "hr", ("hr",)),
        ("segmentation", "s2", ("s2",)),
        ("segmentation", "fused", ("s2", "s1")),
    ],
)
def test_task_model_outputs(kind, source, mods):
    enc = StandInSkySense()
    batch = make_batch(b=2, hr=64, s=8, mods=mods)
    model = build_task_model(enc, kind, source, 5, batch, head_channels=8, aux_weight=0.4)
    out = model(batch)
    if kind in ("classification", "multilabel"):
        assert out["logits"].shape == (2, 5)
    else:
        size = 64 if source == "hr" else 8
        assert out["logits"].shape == (2, 5, size, size)
        if kind == "segmentation":
            assert out["aux"].shape == out["logits"].shape
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_change_model_runs_both_dates_through_one_encoder():
    enc = StandInSkySense()
    t1 = make_batch(b=2, s=16, t2=1, mods=("s2",))
    t2 = {k: v.clone() for k, v in t1.items()}
    t2["s2"] = t2["s2"] + 0.5
    model = build_task_model(enc, "change", "s2", 2, {"t1": t1, "t2": t2}, head_channels=8)
    out = model({"t1": t1, "t2": t2})["logits"]
    assert out.shape == (2, 2, 16, 16)
    with pytest.raises(KeyError, match="t1"):
        model(t1)


def test_linear_probing_freezes_the_encoder():
    enc = StandInSkySense()
    batch = make_batch(mods=("hr",))
    model = build_task_model(enc, "classification", "hr", 3, batch, freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.head.training
    model(batch)["logits"].sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.fc.weight.grad is not None
    groups = optim.param_groups(model, 0.05, layer_decay=0.5)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.head.parameters()))


def test_missing_modality_is_a_clear_error():
    enc = StandInSkySense()
    model = TaskModel(enc, "classification", "hr", 3, [8, 16, 24, 32])
    with pytest.raises(KeyError, match="needs the 'hr' modality"):
        model(make_batch(mods=("s2",), s=8))


def test_layer_decay_orders_depths():
    enc = StandInSkySense()
    model = TaskModel(enc, "classification", "fused", 3, [16])
    depth, top = optim.encoder_depths(enc)
    assert depth["hr.patch_embed.weight"] == 0
    assert depth["s2.patch_embed.weight"] == 0
    # HR: stage 0 downsample, stage 0 block 0, stage 1 ... are counted in registration order.
    assert depth["hr.stages.0.downsample.weight"] < depth["hr.stages.0.blocks.0.weight"]
    assert depth["hr.stages.0.blocks.0.weight"] < depth["hr.stages.3.blocks.0.weight"]
    assert depth["s2.blocks.0.weight"] < depth["s2.blocks.3.weight"]
    # The fusion branch lies after the deepest spatial branch.
    spatial = max(v for k, v in depth.items() if not k.startswith("fusion"))
    assert min(v for k, v in depth.items() if k.startswith("fusion")) >= spatial
    assert depth["fusion.layers.1.weight"] == top
    groups = optim.param_groups(model, 0.05, layer_decay=0.9)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale_of[id(model.head.fc.weight)] == 1.0
    assert scale_of[id(enc.hr.patch_embed.weight)] == pytest.approx(0.9 ** (top + 1))
    assert scale_of[id(enc.fusion.layers[1].weight)] == pytest.approx(0.9)
    assert wd_of[id(enc.hr.patch_embed.bias)] == 0.0 and wd_of[id(enc.dtpe)] == 0.0
    assert wd_of[id(enc.hr.patch_embed.weight)] == 0.05
    flat = optim.param_groups(model, 0.05, layer_decay=1.0)
    assert {g["lr_scale"] for g in flat} == {1.0}


@pytest.fixture
def standin_builder(monkeypatch):
    monkeypatch.setattr(skysense.encoders, "build_skysense", build_standin, raising=False)


def _pretrain_ckpt(path, model, **extra):
    sd = model.state_dict()
    torch.save(
        {
            "student": {k: v + 1 for k, v in sd.items()},
            "teacher": sd,
            "config": {"model": {"preset": "tiny", "overrides": {}}},
            "optimizer": {},
            **extra,
        },
        path,
    )


def test_encoder_from_checkpoint_loads_teacher_strictly(tmp_path, standin_builder):
    src = StandInSkySense()
    _pretrain_ckpt(tmp_path / "c.pt", src)
    enc, info = ckpt.build_encoder("tiny", {}, tmp_path / "c.pt")
    assert info["key"] == "teacher" and not any(info["report"].values())
    for (k, a), b in zip(enc.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), k
    student, _ = ckpt.build_encoder("tiny", {}, tmp_path / "c.pt", key="student")
    assert torch.equal(student.dtpe, src.dtpe + 1)
    # A checkpoint of another architecture: every mismatch is named.
    other = StandInSkySense(vit_dim=8)
    sd = other.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["dtpe"]
    torch.save(
        {"teacher": sd, "config": {"model": {"preset": "tiny", "overrides": {}}}}, tmp_path / "o.pt"
    )
    with pytest.raises(ckpt.CheckpointMismatch) as e:
        ckpt.build_encoder("tiny", {}, tmp_path / "o.pt")
    msg = str(e.value)
    assert "1 missing: dtpe" in msg and "1 unexpected: extra.weight" in msg
    assert "s1.patch_embed.weight: checkpoint (8, 2, 4, 4) vs model (12, 2, 4, 4)" in msg
    assert "+9 more" in msg  # long lists are cut, with the count
    enc, info = ckpt.build_encoder("tiny", {}, tmp_path / "o.pt", strict=False)
    assert info["report"]["missing"] == ["dtpe"]
    with pytest.raises(KeyError, match="no 'ema'"):
        ckpt.build_encoder("tiny", {}, tmp_path / "c.pt", key="ema")
    with pytest.raises(CheckpointError, match="nope.pt: does not exist"):
        ckpt.build_encoder("tiny", {}, tmp_path / "nope.pt")


def test_encoder_rebuilt_from_checkpoint_config(tmp_path, standin_builder):
    src = StandInSkySense(vit_dim=8)
    torch.save(
        {
            "teacher": src.state_dict(),
            "config": {"model": {"preset": "tiny", "overrides": {"vit_dim": 8}}},
        },
        tmp_path / "c.pt",
    )
    enc, info = ckpt.build_encoder("tiny", {}, tmp_path / "c.pt")
    assert info["overrides"] == {"vit_dim": 8}
    assert enc.s2.patch_embed.weight.shape[0] == 8


def test_finetuned_file_round_trip(tmp_path, standin_builder):
    enc = StandInSkySense()
    batch = make_batch(mods=("hr",))
    model = build_task_model(enc, "segmentation", "hr", 4, batch, head_channels=8)
    meta = {
        "preset": "tiny",
        "overrides": {},
        "kind": "segmentation",
        "source": "hr",
        "n_classes": 4,
        "channels": [8, 16, 24, 32],
        "head": {"head_channels": 8},
    }
    path = ckpt.save_finetuned(tmp_path / "m.pt", model, meta)
    loaded, meta2 = ckpt.load_finetuned(path)
    model.eval()
    torch.testing.assert_close(loaded(batch)["logits"], model(batch)["logits"])
    with pytest.raises(ValueError, match="fine-tuned model file, not a pre-training"):
        ckpt.build_encoder("tiny", {}, path)
    _pretrain_ckpt(tmp_path / "p.pt", enc)
    with pytest.raises(ValueError, match="fine-tune it first"):
        ckpt.load_finetuned(tmp_path / "p.pt")


def test_detection_model_trains_and_predicts_in_caller_labels():
    enc = StandInSkySense()
    images = torch.randn(2, 3, 64, 64)
    model = build_task_model(enc, "detection", "hr", 2, {"hr": images}, fpn_channels=16)
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4, 20, 24], [30, 30, 50, 44]]),
            "labels": torch.tensor([0, 1]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    total.backward()
    assert model.detector.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    assert enc.hr.patch_embed.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(o["labels"].min() >= 0 for o in out if len(o["labels"]))
    with pytest.raises(ValueError, match=r"labels must be in 0..1"):
        model.train()(images, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([0, 2])}] * 2)


def test_grid_alignment_lies_between_the_encoders_and_the_fusion():
    depth, _ = optim.encoder_depths(StandInSkySense())
    grid = {v for k, v in depth.items() if k.startswith("grid")}
    assert len(grid) == 1
    g = grid.pop()
    assert max(v for k, v in depth.items() if k.startswith(("hr.", "s2.", "s1."))) < g
    assert g < min(v for k, v in depth.items() if k.startswith("fusion."))

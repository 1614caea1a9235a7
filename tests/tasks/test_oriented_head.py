"""The oriented detection branch (heads/oriented.py): rotated-box conversions and decoding
against plain references, and the detector training on and predicting rotated boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_downstream_standin import StandInSkySense

from skysense.data.datasets.oriented import polygon_iou, rotated_map
from skysense.tasks.downstream.heads.oriented import (
    canonical_obb,
    decode_obb,
    encode_obb,
    obb_to_polygons,
    polygons_to_obb,
)
from skysense.tasks.downstream.model import build_task_model

pytestmark = pytest.mark.unit


def _corners_reference(cx, cy, w, h, t):
    """A w x h rectangle centred on the origin, turned by t (x right, y down), then moved."""
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return (local @ rot.T + [cx, cy]).reshape(-1)


def _random_obb(n, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.uniform(10, 90, n), g.uniform(10, 90, n), g.uniform(4, 40, n),
                     g.uniform(2, 30, n), g.uniform(-3.0, 3.0, n)], 1)  # fmt: skip


def test_polygons_match_the_rotation_matrix_reference():
    obb = _random_obb(20)
    got = obb_to_polygons(torch.tensor(obb)).numpy()
    for row, want in zip(got, (_corners_reference(*b) for b in obb)):
        np.testing.assert_allclose(row, want, atol=1e-9)


def test_polygon_to_obb_is_canonical_and_the_same_rectangle():
    # A 4 x 2 rectangle turned 30 degrees, its corners starting on a short side.
    poly = _corners_reference(5.0, 7.0, 2.0, 4.0, math.radians(30))
    obb = polygons_to_obb(torch.tensor(poly)[None]).numpy()[0]
    np.testing.assert_allclose(obb[:4], [5.0, 7.0, 4.0, 2.0], atol=1e-9)
    assert obb[4] == pytest.approx(math.radians(30) + math.pi / 2 - math.pi)  # long side, wrapped
    for b in _random_obb(30, seed=1):
        c = polygons_to_obb(torch.tensor(_corners_reference(*b))[None])[0]
        assert c[2] >= c[3] and -math.pi / 2 <= c[4] < math.pi / 2
        back = obb_to_polygons(c[None])[0].numpy()
        assert polygon_iou(back, _corners_reference(*b)) == pytest.approx(1.0, abs=1e-9)


def test_canonical_obb_keeps_the_rectangle():
    obb = torch.tensor(_random_obb(25, seed=2))
    can = canonical_obb(obb)
    for a, b in zip(obb_to_polygons(obb).numpy(), obb_to_polygons(can).numpy()):
        assert polygon_iou(a, b) == pytest.approx(1.0, abs=1e-9)


def test_decode_inverts_encode_and_is_continuous_across_the_wrap():
    obb = canonical_obb(torch.tensor(_random_obb(40, seed=3)))
    g = np.random.default_rng(4)
    x0, y0 = g.uniform(0, 60, 40), g.uniform(0, 60, 40)
    rois = torch.tensor(np.stack([x0, y0, x0 + g.uniform(5, 50, 40), y0 + g.uniform(5, 50, 40)], 1))
    back = decode_obb(encode_obb(obb, rois), rois)
    torch.testing.assert_close(back, obb, atol=1e-9, rtol=1e-9)
    # Angles just either side of +-90 degrees: nearly the same box, nearly the same deltas.
    roi = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    a = canonical_obb(torch.tensor([[10.0, 10, 12, 4, math.pi / 2 - 1e-3],
                                    [10.0, 10, 12, 4, -math.pi / 2 + 1e-3]]))  # fmt: skip
    d = encode_obb(a, roi)
    assert (d[0] - d[1]).abs().max() < 5e-3
    assert polygon_iou(*obb_to_polygons(a).numpy()) > 0.99


def _scene():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    polys = [
        torch.tensor(
            np.stack(
                [_corners_reference(20, 20, 24, 8, 0.5), _corners_reference(44, 44, 16, 6, -1.0)]
            )
        ),
        torch.zeros(0, 8, dtype=torch.float64),
    ]
    targets = []
    for p, lab in zip(polys, (torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64))):
        q = p.reshape(-1, 4, 2).float()
        env = torch.cat([q.min(1).values, q.max(1).values], 1).reshape(-1, 4)
        targets.append({"boxes": env, "labels": lab, "polygons": p.float()})
    return images, targets


def test_oriented_detector_trains_and_predicts_rotated_boxes():
    torch.manual_seed(0)
    images, targets = _scene()
    model = build_task_model(StandInSkySense(), "detection", "hr", 2, {"hr": images},
                             fpn_channels=16, oriented=True)  # fmt: skip
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_obb_reg", "loss_objectness",
                           "loss_rpn_box_reg"}  # fmt: skip
    assert float(losses["loss_obb_reg"].detach()) > 0
    sum(losses.values()).backward()
    assert model.detector.roi_heads.obb_predictor.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'polygons'"):
        model(images, [{k: v for k, v in t.items() if k != "polygons"} for t in targets])
    # The branch learns: on fixed features and proposals, its loss falls when only it trains.
    det = model.detector
    with torch.no_grad():
        feats = det.backbone(images)
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(2, 64, 2, generator=g) * 40
    props = [torch.cat([xy[i], xy[i] + 8 + torch.rand(64, 2, generator=g) * 24], 1) for i in (0, 1)]
    shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
    opt = torch.optim.Adam(det.roi_heads.obb_predictor.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        torch.manual_seed(1)  # the same RoI sample each step
        loss = det.roi_heads(feats, props, [(64, 64)] * 2, shifted)[1]["loss_obb_reg"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o in out:
        n = len(o["boxes"])
        assert o["polygons"].shape == (n, 8) and o["obb"].shape == (n, 5)
        assert (o["obb"][:, 2] >= o["obb"][:, 3]).all()
        if n:
            assert o["labels"].min() >= 0
            torch.testing.assert_close(o["polygons"], obb_to_polygons(o["obb"]))
    # The rotated-box mAP takes the predicted polygons as they come.
    preds = [{"polygons": o["polygons"].numpy(), "scores": o["scores"].numpy(),
              "labels": o["labels"].numpy()} for o in out]  # fmt: skip
    gts = [{"polygons": t["polygons"].numpy(), "labels": t["labels"].numpy()} for t in targets]
    res = rotated_map(preds, gts)
    assert 0.0 <= res["mAP"] <= 1.0


def test_horizontal_detector_is_unchanged_by_default():
    images, targets = _scene()
    model = build_task_model(StandInSkySense(), "detection", "hr", 2, {"hr": images},
                             fpn_channels=16)  # fmt: skip
    assert not hasattr(model.detector.roi_heads, "obb_predictor")
    model.train()
    assert "loss_obb_reg" not in model(images, targets)  # polygons are ignored
    model.eval()
    with torch.no_grad():
        assert set(model(images)[0]) == {"boxes", "scores", "labels"}

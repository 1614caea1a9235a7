"""The downstream metrics against hand-computed cases and independent brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from skysense.tasks.downstream import metrics as M

pytestmark = pytest.mark.unit


def test_confusion_matrix_and_segmentation_scores_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3])
    cm = M.confusion_matrix(pred, target, n_classes=4, ignore_index=255)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert M.overall_accuracy(cm) == pytest.approx(4 / 6)
    iou = M.per_class_iou(cm)
    assert iou[:3].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert math.isnan(iou[3])  # class 3 absent from targets and predictions
    f1 = M.per_class_f1(cm)
    assert f1[:3].tolist() == pytest.approx([4 / 5, 1 / 2, 2 / 3])
    s = M.segmentation_scores(cm)
    assert s["mIoU"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert s["mF1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        M.confusion_matrix(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="target class 5 outside 0..2"):
        M.confusion_matrix(torch.zeros(2), torch.tensor([0, 5]), 3)


def test_confusion_matrix_against_a_loop_on_random_input():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 5, (7, 13, 11), generator=g)
    target = torch.randint(0, 6, (7, 13, 11), generator=g)
    target[target == 5] = 255
    ref = torch.zeros(5, 5, dtype=torch.int64)
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t != 255:
            ref[t, p] += 1
    acc = M.ConfusionMatrix(5, ignore_index=255)
    acc.update(pred[:3], target[:3])
    acc.update(pred[3:], target[3:])
    assert torch.equal(acc.compute(), ref)


def test_binary_scores_of_the_change_class():
    # target: 6 no-change, 4 change; predictions: 3 of the changes found, 2 false alarms.
    target = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    s = M.binary_scores(M.confusion_matrix(pred, target, 2))
    assert s["precision"] == pytest.approx(3 / 5)
    assert s["recall"] == pytest.approx(3 / 4)
    assert s["F1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert s["IoU"] == pytest.approx(3 / 6)
    none = M.binary_scores(M.confusion_matrix(torch.zeros(4), torch.zeros(4), 2))
    assert math.isnan(none["F1"]) and math.isnan(none["recall"])
    missed = M.binary_scores(M.confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 1, 0]), 2))
    assert missed["F1"] == 0.0 and missed["IoU"] == 0.0


def test_average_precision_by_hand():
    # precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    ap = M.average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx(0.5 + 1 / 3)
    # Tied scores are one threshold: P = 1/2 at R = 1, whatever the order of the tied pair.
    assert M.average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    assert M.average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert math.isnan(M.average_precision(torch.rand(5), torch.zeros(5)))


def test_average_precision_against_mean_precision_at_positives():
    # Without ties, AP = mean over the positives of the precision at their rank.
    g = torch.Generator().manual_seed(2)
    for n in (1, 7, 50, 333):
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        target = (torch.rand(n, generator=g) < 0.3).long()
        if target.sum() == 0:
            target[0] = 1
        order = torch.argsort(scores, descending=True)
        t = target[order]
        ranks = torch.arange(1, n + 1, dtype=torch.float64)
        prec_at = torch.cumsum(t, 0) / ranks
        ref = float(prec_at[t == 1].mean())
        assert M.average_precision(scores, target) == pytest.approx(ref, abs=1e-12)


def test_multilabel_average_precision_macro_micro():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.6, 0.7, 0.1]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    per = M.multilabel_average_precision(scores, target, average=None)
    # class 0: only positive ranked first -> 1; class 1: positives ranked 1, 2 -> 1;
    # class 2: no positive -> NaN, left out of the macro mean.
    assert per[:2].tolist() == [1.0, 1.0] and math.isnan(per[2])
    assert M.multilabel_average_precision(scores, target) == 1.0
    # micro: 9 pairs sorted .9(1) .8(1) .7(1) .6(0) .3(0) .2(0) .2(0) .1(0) .1(0) -> AP 1.
    assert M.multilabel_average_precision(scores, target, average="micro") == 1.0
    target2 = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 0]])
    # class 0: positive at rank 2 -> 1/2; class 1: ranks 1, 2 -> 1; class 2: rank 1 (0.3) -> 1.
    assert M.multilabel_average_precision(scores, target2) == pytest.approx((0.5 + 1 + 1) / 3)
    acc = M.MultilabelAveragePrecision(3)
    acc.update(scores[:2], target2[:2])
    acc.update(scores[2:], target2[2:])
    out = acc.compute()
    assert out["mAP"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        acc.update(torch.rand(2, 4), torch.zeros(2, 4))


def _det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _gt(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_detection_average_precision_by_hand():
    targets = [
        _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1]),
        _gt([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 2]),
    ]
    preds = [
        # .9 hits A; .8 overlaps A again (A taken: false positive); .7 hits B.
        _det([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1]),
        # .6 misses C; a class-3 detection on an image without class 3 changes nothing.
        _det([[50, 50, 60, 60], [0, 0, 5, 5]], [0.6, 0.95], [1, 3]),
    ]
    # class 1: TP FP TP FP, 3 GT: recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2,
    # envelope 1 2/3 2/3 1/2. "all": 1/3 * 1 + 1/3 * 2/3 = 5/9.
    # coco101: recall points 0..0.33 (34) -> 1, 0.34..0.66 (33) -> 2/3, 0.67..1 (34) -> 0.
    out = M.detection_average_precision(preds, targets, 0.5, "all")
    assert out["per_class"][1] == pytest.approx(5 / 9)
    assert out["per_class"][2] == 0.0  # ground truth, no detection
    assert 3 not in out["per_class"]
    assert out["mAP"] == pytest.approx(5 / 18)
    coco = M.detection_average_precision(preds, targets, 0.5, "coco101")
    assert coco["per_class"][1] == pytest.approx((34 + 33 * 2 / 3) / 101)


def test_detection_iou_threshold_is_inclusive_and_matches_once():
    targets = [_gt([[0, 0, 10, 20]], [0])]
    preds = [_det([[0, 0, 10, 10]], [0.5], [0])]  # IoU exactly 0.5
    assert M.detection_average_precision(preds, targets, 0.5)["mAP"] == 1.0
    assert M.detection_average_precision(preds, targets, 0.51)["mAP"] == 0.0
    # Two detections on one box: the second is a false positive ranked below -> AP still 1.
    preds = [_det([[0, 0, 10, 20], [0, 0, 10, 19]], [0.9, 0.8], [0, 0])]
    assert M.detection_average_precision(preds, targets, 0.5, "all")["mAP"] == 1.0
    # A false positive ranked above the true positive halves the precision at full recall.
    preds = [_det([[30, 30, 40, 40], [0, 0, 10, 20]], [0.9, 0.8], [0, 0])]
    assert M.detection_average_precision(preds, targets, 0.5, "all")["mAP"] == 0.5


def test_box_iou_against_brute_force():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(9, 2, generator=g) * 50
    a = torch.cat([xy, xy + torch.rand(9, 2, generator=g) * 30 + 1], 1)
    xy = torch.rand(5, 2, generator=g) * 50
    b = torch.cat([xy, xy + torch.rand(5, 2, generator=g) * 30 + 1], 1)
    ious = M.box_iou(a, b)
    for i in range(9):
        for j in range(5):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = w * h
            ua = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])
            ub = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            assert ious[i, j] == pytest.approx(float(inter / (ua + ub - inter)), rel=1e-5)

"""Oriented boxes on top of the horizontal Faster R-CNN: a rotated-box regression branch beside
the box head (horizontal RoIs -> oriented boxes, the DOTA "Faster R-CNN OBB" baseline's shape).

A rotated box is ``(cx, cy, w, h, theta)`` in pixels and radians, in the long-side convention:
``w >= h`` and ``theta`` in [-pi/2, pi/2) is the angle of the long side from the x axis (y
down, as image rows). A rectangle is the same after a half turn, so the branch regresses
``(sin 2 theta, cos 2 theta)``: continuous across the +-pi/2 wrap, where ``theta`` itself jumps.

Encoding against a horizontal RoI ``(x0, y0, x1, y1)`` with centre ``(rx, ry)``, size ``(rw,
rh)`` and scale ``s = sqrt(rw rh)``::

    dx = (cx - rx) / rw   dy = (cy - ry) / rh   dw = log(w / s)   dh = log(h / s)
    ds = sin 2 theta      dc = cos 2 theta

(the side lengths against one scale, since which RoI side a rotated long side lies along
depends on the angle). The loss is smooth L1 on the positives' class-specific deltas of their
matched ground truth, normalised by the sampled RoIs, as torchvision's box loss.

Post-processing keeps torchvision's steps (softmax, score threshold, per-class NMS, top k) and
carries each kept detection's oriented box; NMS runs on the horizontal boxes (torchvision has
no rotated NMS), so two rotated boxes whose envelopes overlap more than the NMS threshold keep
only the higher-scoring one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import boxes as box_ops

N_OBB = 6  # dx dy dw dh sin2t cos2t
_CLAMP = math.log(1000.0 / 16)  # torchvision's bound on exp() of size deltas


def canonical_obb(obb: Tensor) -> Tensor:
    """(N, 5) rotated boxes -> the same boxes with ``w >= h`` and theta in [-pi/2, pi/2)."""
    cx, cy, w, h, t = obb.unbind(-1)
    swap = h > w
    w2, h2 = torch.where(swap, h, w), torch.where(swap, w, h)
    t = torch.where(swap, t + math.pi / 2, t)
    t = torch.remainder(t + math.pi / 2, math.pi) - math.pi / 2
    return torch.stack([cx, cy, w2, h2, t], -1)


def polygons_to_obb(polys: Tensor) -> Tensor:
    """(N, 8) corners in order around the box -> (N, 5) canonical rotated boxes. A
    quadrilateral that is not a rectangle becomes the rectangle of its mean opposite sides."""
    p = polys.reshape(-1, 4, 2).to(torch.float64)
    c = p.mean(1)
    e1 = ((p[:, 1] - p[:, 0]) + (p[:, 2] - p[:, 3])) / 2
    e2 = ((p[:, 2] - p[:, 1]) + (p[:, 3] - p[:, 0])) / 2
    w, h = e1.norm(dim=-1), e2.norm(dim=-1)
    t = torch.atan2(e1[:, 1], e1[:, 0])
    return canonical_obb(torch.stack([c[:, 0], c[:, 1], w, h, t], -1)).to(polys.dtype)


def obb_to_polygons(obb: Tensor) -> Tensor:
    """(N, 5) rotated boxes -> (N, 8) corners ``x1 y1 .. x4 y4`` in order around the box."""
    cx, cy, w, h, t = obb.unbind(-1)
    ux, uy = torch.cos(t) * w / 2, torch.sin(t) * w / 2
    vx, vy = -torch.sin(t) * h / 2, torch.cos(t) * h / 2
    xs = torch.stack([cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx], -1)
    ys = torch.stack([cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy], -1)
    return torch.stack([xs, ys], -1).reshape(-1, 8)


def _roi_geometry(rois: Tensor):
    rw = (rois[:, 2] - rois[:, 0]).clamp(min=1e-3)
    rh = (rois[:, 3] - rois[:, 1]).clamp(min=1e-3)
    return rois[:, 0] + 0.5 * rw, rois[:, 1] + 0.5 * rh, rw, rh, torch.sqrt(rw * rh)


def encode_obb(obb: Tensor, rois: Tensor) -> Tensor:
    """(N, 5) canonical rotated boxes against (N, 4) horizontal RoIs -> (N, 6) deltas."""
    rx, ry, rw, rh, s = _roi_geometry(rois)
    cx, cy, w, h, t = obb.unbind(-1)
    return torch.stack(
        [(cx - rx) / rw, (cy - ry) / rh, torch.log(w / s), torch.log(h / s),
         torch.sin(2 * t), torch.cos(2 * t)], -1,
    )  # fmt: skip


def decode_obb(deltas: Tensor, rois: Tensor) -> Tensor:
    """(N, 6) deltas against (N, 4) horizontal RoIs -> (N, 5) canonical rotated boxes."""
    rx, ry, rw, rh, s = _roi_geometry(rois)
    dx, dy, dw, dh, ds, dc = deltas.unbind(-1)
    w = s * torch.exp(dw.clamp(max=_CLAMP))
    h = s * torch.exp(dh.clamp(max=_CLAMP))
    t = 0.5 * torch.atan2(ds, dc)
    return canonical_obb(torch.stack([rx + dx * rw, ry + dy * rh, w, h, t], -1))


class OrientedRoIHeads(RoIHeads):
    """torchvision's RoI heads plus a class-specific rotated-box branch on the box head's
    features (``representation`` wide). Targets need ``polygons`` (M, 8) beside ``boxes`` (their
    envelopes) and ``labels``; detections gain ``polygons`` (N, 8) and ``obb`` (N, 5)."""

    def __init__(self, base: RoIHeads, representation: int, n_outputs: int):
        super().__init__(
            base.box_roi_pool, base.box_head, base.box_predictor,
            base.proposal_matcher.high_threshold, base.proposal_matcher.low_threshold,
            base.fg_bg_sampler.batch_size_per_image, base.fg_bg_sampler.positive_fraction,
            base.box_coder.weights, base.score_thresh, base.nms_thresh, base.detections_per_img,
        )  # fmt: skip
        self.obb_predictor = nn.Linear(representation, n_outputs * N_OBB)

    def oriented_loss(self, obb_deltas, proposals, matched_idxs, labels, targets) -> Tensor:
        """Smooth L1 over the positives' class-specific deltas, / the sampled RoIs."""
        labels_all = torch.cat(labels)
        pos = torch.where(labels_all > 0)[0]
        if pos.numel() == 0:
            return obb_deltas.sum() * 0.0
        gt = []
        for props, idx, t in zip(proposals, matched_idxs, targets):
            g = polygons_to_obb(t["polygons"].to(props.dtype))
            if g.numel() == 0:  # no ground truth: every RoI is background, none is used
                g = props.new_tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
            gt.append(encode_obb(g[idx.clamp(min=0)], props))
        want = torch.cat(gt)[pos]
        pred = obb_deltas.reshape(len(labels_all), -1, N_OBB)[pos, labels_all[pos]]
        return F.smooth_l1_loss(pred, want, beta=1 / 9, reduction="sum") / labels_all.numel()

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None or any("polygons" not in t for t in targets):
                raise ValueError("the oriented head trains on targets with 'polygons' (M, 8)")
            proposals, matched_idxs, labels, reg_targets = self.select_training_samples(
                proposals, targets
            )
        feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(feats)
        obb_deltas = self.obb_predictor(feats)
        if self.training:
            loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, reg_targets)
            loss_obb = self.oriented_loss(obb_deltas, proposals, matched_idxs, labels, targets)
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box,
                        "loss_obb_reg": loss_obb}  # fmt: skip
        return self.postprocess(
            class_logits, box_regression, obb_deltas, proposals, image_shapes
        ), {}

    def postprocess(self, class_logits, box_regression, obb_deltas, proposals, image_shapes):
        """torchvision's post-processing, each detection carrying its rotated box."""
        n_out = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        rois = torch.cat(proposals)
        boxes_all = self.box_coder.decode(box_regression, proposals)  # (R, C, 4)
        obb_all = decode_obb(
            obb_deltas.reshape(-1, N_OBB), rois.repeat_interleave(n_out, 0)
        ).reshape(len(rois), n_out, 5)
        scores_all = F.softmax(class_logits, -1)
        result = []
        for boxes, obb, scores, shape in zip(
            boxes_all.split(per_image), obb_all.split(per_image), scores_all.split(per_image),
            image_shapes,
        ):  # fmt: skip
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(n_out, device=scores.device).view(1, -1).expand_as(scores)
            boxes, obb = boxes[:, 1:].reshape(-1, 4), obb[:, 1:].reshape(-1, 5)
            scores, labels = scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[
                box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)
            ]
            keep = keep[: self.detections_per_img]
            result.append({
                "boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                "obb": obb[keep], "polygons": obb_to_polygons(obb[keep]),
            })  # fmt: skip
        return result

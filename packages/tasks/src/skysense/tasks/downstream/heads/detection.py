"""Object detection with horizontal boxes: torchvision's Faster R-CNN on an FPN over the four
Swin V2 stages of the HR encoder (the paper's DIOR setting).

torchvision supplies the detector (RPN, RoIAlign, box head, losses, post-processing); this
module supplies the backbone (SkySense HR encoder + FPN), keeps images at their native ground
sampling distance (no resizing: object sizes in pixels must stay what the encoder saw in
pre-training) and shifts labels so that callers use 0..K-1 (torchvision reserves 0 for the
background)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class SwinFPN(nn.Module):
    """HR images -> FPN levels "0".."3" (strides 4..32) and "pool" (stride 64).

    Args:
        encoder: a SkySense model (its forward takes ``{"hr": x}`` and returns ``hr_stages``).
        in_channels: channels of the four Swin stages.
        out_channels: FPN width.
    """

    def __init__(self, encoder: nn.Module, in_channels: Sequence[int], out_channels: int = 64):
        super().__init__()
        self.encoder = encoder
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.fpn_in_channels = list(in_channels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x: (B, 3, H, W) float32, normalised -> OrderedDict of (B, out_channels, h_i, w_i)."""
        stages = self.encoder({"hr": x})["hr_stages"]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(stages)))


class NativeScaleTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize (images are already normalised and
    at their native scale); it still batches images, padding to ``size_divisible``."""

    def resize(self, image, target=None):
        return image, target


class SkySenseFasterRCNN(nn.Module):
    """Faster R-CNN + FPN on the SkySense HR encoder.

    Args:
        encoder: SkySense model.
        in_channels: channels of the four Swin stages.
        n_classes: K object classes (labels 0..K-1; the background is internal).
        fpn_channels: FPN width.
        anchor_sizes: anchor side in pixels for each of the 5 FPN levels.
        representation: width of the box head's two fully connected layers.
        size_divisible: images are padded to a multiple of this (the encoder's input stride).
        detections_per_image, score_threshold: post-processing of the box head.
        proposals_train, proposals_test: RPN proposals kept after NMS per image (torchvision's
            defaults, 2000 / 1000, are sized for 800 px images; tiles here are 128-512 px).
        rois_per_image: proposals sampled per image for the box head's loss.
        freeze_encoder: the encoder runs without gradients, in eval mode (frozen backbone).
        oriented: add the rotated-box branch of :mod:`.oriented` (DIOR-R, FAIR1M): targets
            then need ``polygons`` (M, 8) corners, detections gain ``polygons`` (N, 8) and
            ``obb`` (N, 5) ``cx cy w h theta``, and training adds ``loss_obb_reg``.

    ``forward(images, targets=None)``: ``images`` (B, 3, H, W) or a list of (3, H_i, W_i);
    ``targets`` a list of ``{"boxes": (M, 4) xyxy pixels, "labels": (M,) int64 in 0..K-1}``.
    Training mode returns the dict of losses, eval mode a list of
    ``{"boxes", "scores", "labels" (0..K-1)}``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: Sequence[int],
        n_classes: int,
        fpn_channels: int = 64,
        anchor_sizes: Sequence[int] = (16, 32, 64, 128, 256),
        representation: int = 256,
        size_divisible: int = 32,
        detections_per_image: int = 100,
        score_threshold: float = 0.05,
        proposals_train: int = 500,
        proposals_test: int = 300,
        rois_per_image: int = 128,
        freeze_encoder: bool = False,
        oriented: bool = False,
    ):
        super().__init__()
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {anchor_sizes}")
        backbone = SwinFPN(encoder, in_channels, fpn_channels)
        anchors = AnchorGenerator(
            sizes=tuple((int(s),) for s in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5
        )
        roi = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        self.n_classes = n_classes
        self.detector = FasterRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, n_classes + 1),
            box_detections_per_img=detections_per_image,
            box_score_thresh=score_threshold,
            rpn_pre_nms_top_n_train=2 * proposals_train,
            rpn_post_nms_top_n_train=proposals_train,
            rpn_pre_nms_top_n_test=2 * proposals_test,
            rpn_post_nms_top_n_test=proposals_test,
            box_batch_size_per_image=rois_per_image,
        )
        self.detector.transform = NativeScaleTransform(
            min_size=1,
            max_size=1,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            size_divisible=size_divisible,
        )
        self.oriented = bool(oriented)
        if self.oriented:
            from skysense.tasks.downstream.heads.oriented import OrientedRoIHeads

            self.detector.roi_heads = OrientedRoIHeads(
                self.detector.roi_heads, representation, n_classes + 1
            )

    @property
    def encoder(self) -> nn.Module:
        return self.detector.backbone.encoder

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, images, targets: list[dict] | None = None):
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"detection expects HR images (B, 3, H, W), got {tuple(images.shape)}"
                )
            images = list(images)
        if targets is not None:
            shifted = []
            for i, t in enumerate(targets):
                labels = t["labels"]
                if labels.numel() and (
                    int(labels.min()) < 0 or int(labels.max()) >= self.n_classes
                ):
                    raise ValueError(
                        f"image {i}: box labels must be in 0..{self.n_classes - 1}, got "
                        f"{labels.unique().tolist()}"
                    )
                st = {"boxes": t["boxes"].float(), "labels": labels.long() + 1}
                if "polygons" in t:
                    st["polygons"] = t["polygons"].float().reshape(-1, 8)
                shifted.append(st)
            targets = shifted
        out = self.detector(images, targets)
        if self.training:
            return out
        return [{**o, "labels": o["labels"] - 1} for o in out]

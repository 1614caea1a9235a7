"""A task model: the SkySense encoder, the features a task reads from it, and the task's head.

:func:`build_task_model` probes the encoder once on an example batch to learn the channels of the
features it returns (so heads fit any preset, and any encoder that keeps the output contract),
then builds the head of the task kind:

=================  =========================================  ================================
kind               head                                       output
=================  =========================================  ================================
classification     pooled features -> LayerNorm -> linear     (B, K) logits, softmax CE
multilabel         same                                       (B, K) logits, sigmoid BCE
segmentation       pyramid -> UperNet (+ auxiliary FCN)       (B, K, H, W) logits
change             two pyramids -> siamese fusion -> UperNet  (B, K, H, W) logits (K = 2)
detection          Faster R-CNN + FPN on the Swin stages      torchvision losses / boxes
=================  =========================================  ================================

Dense outputs are upsampled (bilinear) to the input pixels of the feature source (the HR image
for "hr", the S2 / S1 tile otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skysense.tasks.downstream import features as feat
from skysense.tasks.downstream.heads import (
    ChangeHead,
    ClassificationHead,
    FCNHead,
    SimplePyramid,
    UperNetHead,
)

log = logging.getLogger(__name__)

KINDS = ("classification", "multilabel", "segmentation", "change", "detection")


def probe_channels(encoder: nn.Module, batch: Mapping, source: str) -> list[int]:
    """Channels of each of the source's maps, from one forward of the first sample of ``batch``."""
    one = {k: v[:1] if isinstance(v, Tensor) and v.ndim else v for k, v in batch.items()}
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        out = encoder(one)
    encoder.train(was_training)
    return [m.shape[1] for m in feat.feature_maps(out, source, one)]


class TaskModel(nn.Module):
    """Encoder + head for the classification, multi-label, segmentation and change kinds.

    Args:
        encoder: SkySense model (``forward(batch) -> dict`` of the output contract).
        kind: one of "classification", "multilabel", "segmentation", "change".
        source: feature source (see :mod:`features`).
        n_classes: K.
        channels: channels of the source's maps (from :func:`probe_channels`).
        head_channels: width of the dense heads (and of the pyramid neck for non-HR sources).
        aux_weight: > 0 adds the auxiliary FCN head on the third pyramid level (segmentation).
        freeze_encoder: linear probing: the encoder runs without gradients, in eval mode.
        dropout, norm: of the heads.

    ``forward(batch)`` -> ``{"logits": ..., "aux": ... (training, aux_weight > 0)}``. For "change"
    the batch is ``{"t1": batch, "t2": batch}`` (same pixels, two dates).
    """

    def __init__(
        self,
        encoder: nn.Module,
        kind: str,
        source: str,
        n_classes: int,
        channels: list[int],
        head_channels: int = 64,
        aux_weight: float = 0.0,
        freeze_encoder: bool = False,
        dropout: float = 0.1,
        norm: str = "gn",
    ):
        super().__init__()
        if kind not in KINDS or kind == "detection":
            raise ValueError(f"TaskModel kind must be one of {KINDS[:-1]}, not {kind!r}")
        self.kind, self.source, self.n_classes = kind, feat.check_source(source), n_classes
        self.channels = list(channels)
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        self.neck: nn.Module | None = None
        self.aux: nn.Module | None = None
        self.aux_weight = aux_weight
        if kind in ("classification", "multilabel"):
            self.head = ClassificationHead(channels[-1], n_classes, dropout=dropout)
            return
        pyramid = list(channels)
        if source != "hr":
            self.neck = SimplePyramid(channels, head_channels, norm=norm)
            pyramid = self.neck.out_channels
        if kind == "segmentation":
            self.head = UperNetHead(pyramid, head_channels, n_classes, dropout=dropout, norm=norm)
            if aux_weight > 0:
                level = min(2, len(pyramid) - 1)
                self.aux_level = level
                self.aux = FCNHead(pyramid[level], head_channels, n_classes, norm=norm)
        else:
            self.head = ChangeHead(pyramid, head_channels, n_classes, dropout=dropout, norm=norm)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # linear probing: dropout / drop path of the encoder stay off
        return self

    def _encode(self, batch: Mapping) -> dict:
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(batch)
        return self.encoder(batch)

    def _pyramid(self, out: Mapping, batch: Mapping) -> list[Tensor]:
        maps = feat.feature_maps(out, self.source, batch)
        return self.neck(maps) if self.neck is not None else maps

    def forward(self, batch: Mapping) -> dict[str, Tensor]:
        if self.kind == "change":
            if "t1" not in batch or "t2" not in batch:
                raise KeyError(
                    f"change detection takes {{'t1': batch, 't2': batch}}, got keys {sorted(batch)}"
                )
            b1, b2 = batch["t1"], batch["t2"]
            n = feat.batch_size(b1)
            both = feat.concat_batches(b1, b2)
            out = self._encode(both)
            pyr = self._pyramid(out, both)
            logits = self.head([p[:n] for p in pyr], [p[n:] for p in pyr])
            return {"logits": _resize(logits, feat.source_size(b1, self.source))}
        out = self._encode(batch)
        if self.kind in ("classification", "multilabel"):
            return {"logits": self.head(feat.pooled(out, self.source, batch))}
        pyr = self._pyramid(out, batch)
        size = feat.source_size(batch, self.source)
        res = {"logits": _resize(self.head(pyr), size)}
        if self.aux is not None and self.training:
            res["aux"] = _resize(self.aux(pyr[self.aux_level]), size)
        return res


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_task_model(
    encoder: nn.Module, kind: str, source: str, n_classes: int, example_batch: Mapping, **head
) -> nn.Module:
    """The model of a task kind, sized by probing ``encoder`` on ``example_batch``.

    ``head`` holds the head options: for TaskModel ``head_channels``, ``aux_weight``,
    ``freeze_encoder``, ``dropout``, ``norm``; for detection ``fpn_channels``, ``anchor_sizes``,
    ``representation``, ``size_divisible``, ``freeze_encoder``.
    """
    if kind == "detection":
        from skysense.tasks.downstream.heads.detection import SkySenseFasterRCNN

        if source != "hr":
            raise ValueError(f"detection runs on the HR Swin stages (features: hr), not {source!r}")
        images = example_batch["hr"]
        channels = probe_channels(encoder, {"hr": images}, "hr")
        return SkySenseFasterRCNN(encoder, channels, n_classes, **head)
    probe_batch = example_batch["t1"] if kind == "change" else example_batch
    channels = probe_channels(encoder, probe_batch, source)
    log.info("task %s on %s features: channels %s", kind, source, channels)
    return TaskModel(encoder, kind, source, n_classes, channels, **head)

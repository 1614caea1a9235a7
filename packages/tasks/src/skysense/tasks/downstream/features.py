"""Which encoder features a task uses, and how they are pooled or stacked into a pyramid.

A task names a feature *source*:

- ``"hr"``: the four Swin V2 stages ``hr_stages`` (strides 4, 8, 16, 32 of the HR image);
- ``"s2"`` / ``"s1"``: the ViT taps ``s2_taps`` / ``s1_taps`` (one map per tapped layer at the
  token grid, stride = the ViT patch size), averaged over the valid time steps;
- ``"fused"``: F_fus, the temporal fusion output on the fusion grid;
- ``"geo"``: F_out = concat(F_fus, geo-context read-out).

Single-step sources (change detection on image pairs) and series (time-series classification)
go through the same code: the temporal mean of a single step is that step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from skysense.kernels.modalities import MODALITIES, SERIES

SOURCES = ("hr", "s2", "s1", "fused", "geo")
_OUTPUT_KEY = {"hr": "hr_stages", "s2": "s2_taps", "s1": "s1_taps", "fused": "fused", "geo": "geo"}
# The batch modalities each source needs.
_NEEDS = {"hr": ("hr",), "s2": ("s2",), "s1": ("s1",), "fused": (), "geo": ()}


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"feature source must be one of {SOURCES}, not {source!r}")
    return source


def _get(out: Mapping, source: str, batch: Mapping):
    key = _OUTPUT_KEY[check_source(source)]
    if key not in out:
        mods = [m for m in MODALITIES if m in batch]
        need = _NEEDS[source]
        hint = f" (it needs the {need[0]!r} modality)" if need else ""
        raise KeyError(
            f"the task uses the encoder output {key!r}{hint}, which this encoder output lacks; "
            f"the batch holds the modalities {mods}, the encoder returned {sorted(out)}"
        )
    return out[key]


def temporal_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the valid time steps.

    Args:
        x: (B, T, C, h, w) float.
        valid: (B, T) bool or None (all valid).
    Returns:
        (B, C, h, w); a sample without any valid step gets zeros.
    """
    if valid is None:
        return x.mean(1)
    if valid.shape != x.shape[:2]:
        raise ValueError(
            f"validity mask {tuple(valid.shape)} does not match series {tuple(x.shape[:2])}"
        )
    w = valid.to(x.dtype)[:, :, None, None, None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def feature_maps(out: Mapping, source: str, batch: Mapping) -> list[Tensor]:
    """The source's maps, each (B, C_i, h_i, w_i): 4 Swin stages, the ViT taps (time-averaged
    over ``{m}_valid``), or the single fused / geo map."""
    feats = _get(out, source, batch)
    if source == "hr":
        return list(feats)
    if source in SERIES:
        valid = batch.get(f"{source}_valid")
        return [temporal_mean(t, valid) for t in feats]
    return [feats]


def pooled(out: Mapping, source: str, batch: Mapping) -> Tensor:
    """(B, D) global average of the source's deepest map (the last Swin stage, the last tap,
    or the fused / geo map)."""
    return feature_maps(out, source, batch)[-1].mean((-2, -1))


def source_size(batch: Mapping, source: str) -> tuple[int, int]:
    """(H, W) of the input pixels a dense prediction on ``source`` is made for: the HR image for
    "hr", the S2 / S1 tile otherwise; for "fused" / "geo" the Sentinel grid (S2, else S1, else
    HR), where the data sets put multi-modal masks."""
    order = {"hr": ("hr",), "s2": ("s2",), "s1": ("s1",)}.get(source, ("s2", "s1", "hr"))
    for m in order:
        if m in batch:
            return tuple(batch[m].shape[-2:])
    raise KeyError(
        f"no input modality for feature source {source!r} in the batch ({sorted(batch)})"
    )


def batch_size(batch: Mapping) -> int:
    for m in MODALITIES:
        if m in batch:
            return batch[m].shape[0]
    raise KeyError(f"the batch has none of the modalities hr, s2, s1 (keys: {sorted(batch)})")


def concat_batches(b1: Mapping, b2: Mapping) -> dict:
    """Two batches with the same keys -> one of twice the batch size (tensors concatenated along
    dim 0), so a siamese encoder runs once over both dates."""
    if set(b1) != set(b2):
        raise KeyError(f"the two dates hold different keys: {sorted(b1)} vs {sorted(b2)}")
    out = {}
    for k in b1:
        a, b = b1[k], b2[k]
        if isinstance(a, Tensor):
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"date 1 {k!r} has shape {tuple(a.shape)} but date 2 {tuple(b.shape)}"
                )
            out[k] = torch.cat([a, b])
        else:
            out[k] = a
    return out

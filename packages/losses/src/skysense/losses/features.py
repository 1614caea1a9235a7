"""The encoder output and view keys the losses read, validated, as one shape per feature family.

A family is a set of features one projection head serves: "hr", "s2", "s1" (grid-aligned
modality tokens, (B, T, C_g, h, w)) and "fused" (F_fus, (B, D_f, h, w), read as one always-valid
step). The keys follow docs/contracts.md ("Encoder output" and "Pre-training views").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from skysense.kernels.modalities import MODALITIES

FAMILIES = (*MODALITIES, "fused")


@dataclass
class FamilyFeatures:
    """One family's features in one view.

    Attributes:
        tokens: (B, T, C, h, w) float.
        valid: (B, T) bool; False on padded, unusable or unmatched (index -1) steps.
        index: (B, T) int64 index of each step in the sample's full series (0 for HR and fused,
            which have one acquisition shared by the views).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor


def family_features(
    out: Mapping[str, torch.Tensor],
    view: Mapping[str, torch.Tensor] | None,
    family: str,
    where: str,
) -> FamilyFeatures | None:
    """Read ``family`` from an encoder output (and its view), or None where the modality is
    absent from the batch.

    Args:
        out: encoder output dict (``tokens_*``, ``valid_*``, ``fused``).
        view: the view batch (``s2_index``/``s1_index`` for the series), or None when no step
            matching is needed (cross-modal alignment).
        where: names the source in errors, e.g. "student view 1".
    """
    if family == "fused":
        f = out.get("fused")
        if f is None:
            return None
        if f.ndim != 4:
            raise ValueError(f"{where}: 'fused' must be (B, D_f, h, w), got {tuple(f.shape)}")
        b = f.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=f.device)
        zeros = torch.zeros(b, 1, dtype=torch.long, device=f.device)
        return FamilyFeatures(f[:, None], ones, zeros)
    if family not in MODALITIES:
        raise ValueError(f"unknown feature family {family!r}; expected one of {FAMILIES}")
    tok = out.get(f"tokens_{family}")
    if tok is None:
        return None
    if tok.ndim != 5:
        raise ValueError(
            f"{where}: 'tokens_{family}' must be (B, T, C_g, h, w), got {tuple(tok.shape)}"
        )
    b, t = tok.shape[:2]
    valid = out.get(f"valid_{family}")
    if valid is None:
        raise ValueError(f"{where}: 'tokens_{family}' is present but 'valid_{family}' is missing")
    if tuple(valid.shape) != (b, t):
        raise ValueError(
            f"{where}: 'valid_{family}' has shape {tuple(valid.shape)}, expected ({b}, {t}) "
            f"to match 'tokens_{family}' {tuple(tok.shape)}"
        )
    valid = valid.bool()
    if family == "hr":
        if t != 1:
            raise ValueError(f"{where}: 'tokens_hr' must have one step, got {tuple(tok.shape)}")
        index = torch.zeros(b, 1, dtype=torch.long, device=tok.device)
    elif view is None:
        index = torch.zeros(b, t, dtype=torch.long, device=tok.device)
    else:
        index = view.get(f"{family}_index")
        if index is None:
            raise ValueError(
                f"{where}: the view lacks '{family}_index' (needed to match {family} steps "
                "between the views)"
            )
        if tuple(index.shape) != (b, t):
            raise ValueError(
                f"{where}: '{family}_index' has shape {tuple(index.shape)}, expected ({b}, {t}) "
                f"to match 'tokens_{family}' {tuple(tok.shape)}"
            )
        index = index.long()
        valid = valid & (index >= 0)
    return FamilyFeatures(tok, valid, index)


def paired_family_features(
    student: Sequence[Mapping[str, torch.Tensor]],
    teacher: Sequence[Mapping[str, torch.Tensor]],
    views: Sequence[Mapping[str, torch.Tensor]],
    family: str,
) -> tuple[list[FamilyFeatures | None], list[FamilyFeatures | None]] | None:
    """``family`` in every view on both sides (student list, teacher list), or None where the
    batch lacks it; a family on one side of a view only is an error naming the view."""
    s_f = [
        family_features(o, v, family, f"student view {i + 1}")
        for i, (o, v) in enumerate(zip(student, views))
    ]
    t_f = [
        family_features(o, v, family, f"teacher view {i + 1}")
        for i, (o, v) in enumerate(zip(teacher, views))
    ]
    for i, (s, t) in enumerate(zip(s_f, t_f)):
        if (s is None) != (t is None):
            side = "student" if s is None else "teacher"
            raise ValueError(
                f"view {i + 1}: the {side} output lacks the {family} features the other has"
            )
    if all(s is None for s in s_f):
        return None
    return s_f, t_f

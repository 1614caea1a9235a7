"""Schedules of pre-training and fine-tuning, pure functions of the step (a resumed run needs
only the step to be where it was): the learning rate of both (linear warm-up then cosine,
:func:`warmup_cosine`; fine-tuning may take PANGAEA's :func:`multistep` instead); pre-training's
weight decay (cosine from start to end value) and teacher EMA momentum (cosine from base to 1),
both :func:`cosine`."""

from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total``), clamped."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine down to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), peak, final)


def multistep(
    step: int,
    total: int,
    peak: float,
    milestones: tuple[float, ...] = (0.6, 0.9),
    gamma: float = 0.1,
    warmup: int = 0,
) -> float:
    """Step decay (PANGAEA's fine-tuning schedule): ``peak`` (after an optional linear warm-up
    of ``warmup`` steps), multiplied by ``gamma`` at each milestone passed. ``milestones`` are
    shares of ``total`` (0.6 -> step ``round(0.6 * total)``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    passed = sum(step >= round(m * total) for m in milestones)
    return peak * gamma**passed

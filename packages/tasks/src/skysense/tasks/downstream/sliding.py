"""Sliding-window prediction with overlap and blending, region by region.

A scene of any size is covered by square windows on one global grid: window tops at
``0, s, 2s, ...`` plus a last one flush with the scene's edge (``s`` = window - overlap). Each
window's prediction is weighted by a taper that is 1 in the window's middle and falls smoothly
(sin^2) towards its edges over the overlap, never reaching 0; a pixel's output is the
weighted mean of the predictions of every window that covers it. Seams between windows vanish
because a window's uncertain border counts little where a neighbour sees the same pixels from
its middle.

:func:`predict_region` computes that blend for any rectangle of the scene from exactly the
windows of the global grid that overlap it, so a scene cut into blocks gives the same result as
the whole scene at once (tested), while memory holds one block and one batch of windows: this
is what keeps `skysense infer`'s memory bounded whatever the scene size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class WindowGrid:
    """The windows covering a ``height`` x ``width`` scene (scene pixels)."""

    height: int
    width: int
    window: int
    overlap: int

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window={self.window}), got {self.overlap}")

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def tops(self) -> list[int]:
        return _starts(self.height, self.window, self.stride)

    @property
    def lefts(self) -> list[int]:
        return _starts(self.width, self.window, self.stride)

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    def windows_in(self, y0: int, y1: int, x0: int, x1: int) -> list[tuple[int, int]]:
        """(top, left) of every window overlapping rows [y0, y1) and columns [x0, x1)."""
        w = self.window
        ys = [t for t in self.tops if t < y1 and t + w > y0]
        xs = [left for left in self.lefts if left < x1 and left + w > x0]
        return [(t, left) for t in ys for left in xs]

    def blocks(self, block: int) -> list[tuple[int, int, int, int]]:
        """Rows/columns (y0, y1, x0, x1) of the ``block`` x ``block`` output blocks, row-major."""
        return [
            (y, min(y + block, self.height), x, min(x + block, self.width))
            for y in range(0, self.height, block)
            for x in range(0, self.width, block)
        ]


def taper(window: int, overlap: int) -> Tensor:
    """(window, window) float32 weight: 1 inside, sin^2 ramps over ``overlap`` px at each edge,
    strictly positive (the ramp is sampled at pixel centres)."""
    w = torch.ones(window, dtype=torch.float64)
    if overlap > 0:
        ramp = (
            torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap)
            ** 2
        )
        n = min(overlap, window)
        w[:n] = torch.minimum(w[:n], ramp[:n])
        w[window - n :] = torch.minimum(w[window - n :], ramp[:n].flip(0))
    return (w[:, None] * w[None, :]).float()


def predict_region(
    predict: Callable[[list[tuple[int, int]]], Tensor],
    grid: WindowGrid,
    region: tuple[int, int, int, int],
    n_out: int,
    batch_size: int = 8,
    weight: Tensor | None = None,
    on_window: Callable[[int], None] | None = None,
) -> Tensor:
    """The blended prediction of the rows/columns ``region`` = (y0, y1, x0, x1).

    Args:
        predict: list of window (top, left) -> (n, n_out, window, window) float predictions
            (probabilities); called with at most ``batch_size`` windows at a time.
        grid: the scene's window grid.
        n_out: channels of a prediction.
        weight: (window, window) blending weight (default :func:`taper` of the grid's overlap).
        on_window: called with the number of windows done after each batch (progress bars).
    Returns:
        (n_out, y1 - y0, x1 - x0) float32.
    """
    y0, y1, x0, x1 = region
    win = grid.window
    weight = taper(win, grid.overlap) if weight is None else weight
    acc = torch.zeros(n_out, y1 - y0, x1 - x0)
    wsum = torch.zeros(y1 - y0, x1 - x0)
    windows = grid.windows_in(y0, y1, x0, x1)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        pred = predict(chunk).float().cpu()
        if (
            pred.shape[0] != len(chunk)
            or pred.shape[1] != n_out
            or tuple(pred.shape[-2:]) != (win, win)
        ):
            raise ValueError(
                f"predict returned {tuple(pred.shape)} for {len(chunk)} windows; expected "
                f"({len(chunk)}, {n_out}, {win}, {win})"
            )
        for p, (t, left) in zip(pred, chunk):
            # The part of the window inside both the region and the scene.
            a0, a1 = max(t, y0), min(t + win, y1, grid.height)
            b0, b1 = max(left, x0), min(left + win, x1, grid.width)
            w = weight[a0 - t : a1 - t, b0 - left : b1 - left]
            acc[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += (
                p[:, a0 - t : a1 - t, b0 - left : b1 - left] * w
            )
            wsum[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += w
        if on_window is not None:
            on_window(len(chunk))
    return acc / wsum.clamp_min(1e-12)


def iterate_blocks(grid: WindowGrid, block: int) -> Iterable[tuple[int, int, int, int]]:
    """Blocks whose side is a whole number of strides (at least one window), so that the
    windows shared between neighbouring blocks are few."""
    side = max(grid.window, (block // grid.stride) * grid.stride)
    return grid.blocks(side)

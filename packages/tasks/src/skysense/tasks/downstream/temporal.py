"""Learned aggregation of per-date feature maps: the lightweight temporal attention encoder
(L-TAE, Garnot & Landrieu 2020), as PANGAEA's UperNet-LTAE protocol uses it on multi-temporal
data: a frozen encoder's per-date maps are reduced to one map per pyramid level by L-TAE, then
decoded by UperNet.

L-TAE, per pixel, over the dates t of a series of D-dimensional features e_t:

- the inputs are normalised (LayerNorm), projected to ``d_model`` and a sinusoidal encoding
  of the day of year is added (period ``period`` = 1000, as in the paper): x_t;
- each of ``n_head`` heads h has a learned *master query* q_h (``d_k``); its keys are a linear
  projection of x_t (k_{h,t}, ``d_k``); the attention over dates is
  a_{h,t} = softmax_t(q_h . k_{h,t} / sqrt(d_k)), padded dates (``valid`` False) left out;
- the values of head h are its own slice of x_t's channels (``d_model / n_head`` of them);
  the head's output is sum_t a_{h,t} x_t[slice h]; the heads are concatenated (``d_model``)
  and an MLP (linear + LayerNorm + ReLU) gives ``out_channels``.

:class:`TemporalTaskModel` is a :class:`TaskModel` whose series source (``s2`` / ``s1``: the
ViT taps, (B, T, C, h, w) each) is reduced by one L-TAE per tap instead of the mean over valid
dates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from skysense.kernels.modalities import SERIES
from skysense.tasks.downstream.model import TaskModel

TEMPORAL = ("mean", "ltae")


def doy_encoding(doy: Tensor, dim: int, period: float = 1000.0) -> Tensor:
    """(..., dim) sinusoidal encoding of ``doy`` (..., ) (day of year, any numeric dtype):
    sin / cos pairs at frequencies period ** (-2i / dim)."""
    half = dim // 2
    freq = period ** (-torch.arange(half, dtype=torch.float32, device=doy.device) * 2 / dim)
    ang = doy.float()[..., None] * freq
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], -1)
    if dim % 2:
        enc = torch.cat([enc, torch.zeros_like(enc[..., :1])], -1)
    return enc


class LTAE(nn.Module):
    """L-TAE over the dates of each pixel (module docstring).

    Args:
        in_channels: D of the per-date features.
        out_channels: channels of the aggregated map (default: ``in_channels``).
        n_head: heads (``d_model`` must divide by it).
        d_k: key / query size per head.
        d_model: width of the projected inputs (default: ``in_channels``).
        period: of the day-of-year encoding.

    ``forward(x (B, T, D, h, w) float, doy (B, T) int, valid (B, T) bool | None)`` ->
    ``(B, out_channels, h, w)``; ``attention`` keeps the last (B, n_head, T, h, w) weights.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, n_head: int = 4,
                 d_k: int = 8, d_model: int | None = None, period: float = 1000.0):  # fmt: skip
        super().__init__()
        d_model = d_model or in_channels
        if d_model % n_head:
            raise ValueError(f"L-TAE: d_model {d_model} does not divide into {n_head} heads")
        self.n_head, self.d_k, self.d_model, self.period = n_head, d_k, d_model, period
        self.out_channels = out_channels or in_channels
        self.in_norm = nn.LayerNorm(in_channels)
        self.inp = nn.Linear(in_channels, d_model)
        self.query = nn.Parameter(torch.randn(n_head, d_k) * d_k**-0.5)
        self.key = nn.Linear(d_model, n_head * d_k)
        self.mlp = nn.Sequential(nn.Linear(d_model, self.out_channels),
                                 nn.LayerNorm(self.out_channels), nn.ReLU())  # fmt: skip
        self.attention: Tensor | None = None

    def forward(self, x: Tensor, doy: Tensor, valid: Tensor | None = None) -> Tensor:
        b, t, d, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, d)  # (N, T, D) per pixel
        xs = self.inp(self.in_norm(seq))
        pe = doy_encoding(doy.to(x.device), self.d_model, self.period)  # (B, T, d_model)
        xs = xs + pe.to(xs.dtype).repeat_interleave(h * w, 0)
        k = self.key(xs).view(-1, t, self.n_head, self.d_k)  # (N, T, H, d_k)
        score = torch.einsum("nthk,hk->nht", k, self.query) / math.sqrt(self.d_k)
        if valid is not None:
            pad = ~valid.to(x.device).bool().repeat_interleave(h * w, 0)  # (N, T)
            score = score.masked_fill(pad[:, None, :], torch.finfo(score.dtype).min)
        a = torch.softmax(score, -1)  # (N, H, T): over the dates
        v = xs.view(-1, t, self.n_head, self.d_model // self.n_head)  # each head its slice
        out = torch.einsum("nht,nthc->nhc", a, v).reshape(-1, self.d_model)
        self.attention = a.detach().view(b, h, w, self.n_head, t).permute(0, 3, 4, 1, 2)
        y = self.mlp(out)  # (N, out)
        return y.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)


def _heads_for(c: int, want: int = 4) -> int:
    return next(n for n in range(min(want, c), 0, -1) if c % n == 0)


class TemporalTaskModel(TaskModel):
    """A dense :class:`TaskModel` on a series source (``s2`` / ``s1``) whose per-date maps are
    aggregated by one :class:`LTAE` per tap (same channels in and out) before the neck and
    UperNet. Other sources and the change kind are refused (ValueError). Arguments: those of
    :class:`TaskModel`, plus ``n_head`` and ``d_k`` of the L-TAEs."""

    def __init__(self, encoder: nn.Module, kind: str, source: str, n_classes: int,
                 channels: list[int], n_head: int = 4, d_k: int = 8, **head):  # fmt: skip
        if source not in SERIES or kind != "segmentation":
            raise ValueError(f"L-TAE aggregates an s2 / s1 series for segmentation, not "
                             f"{kind} on {source!r}")  # fmt: skip
        super().__init__(encoder, kind, source, n_classes, channels, **head)
        self.ltae = nn.ModuleList(LTAE(c, c, _heads_for(c, n_head), d_k) for c in channels)

    def _pyramid(self, out: Mapping, batch: Mapping) -> list[Tensor]:
        taps = out[f"{self.source}_taps"]
        doy = batch[f"{self.source}_doy"]
        valid = batch.get(f"{self.source}_valid")
        maps = [m(t.float(), doy, valid) for m, t in zip(self.ltae, taps)]
        return self.neck(maps) if self.neck is not None else maps


def build_temporal_model(encoder: nn.Module, kind: str, source: str, n_classes: int,
                         example_batch: Mapping, temporal: str | None = None, **head) -> nn.Module:  # fmt: skip
    """:func:`build_task_model` for ``temporal`` None / "mean" (the mean over valid dates), a
    :class:`TemporalTaskModel` for "ltae" (channels probed on ``example_batch`` the same way)."""
    from skysense.tasks.downstream.model import build_task_model, probe_channels

    if temporal in (None, "mean"):
        return build_task_model(encoder, kind, source, n_classes, example_batch, **head)
    if temporal != "ltae":
        raise ValueError(f"task.temporal must be one of {TEMPORAL}, not {temporal!r}")
    channels = probe_channels(encoder, example_batch, source)
    return TemporalTaskModel(encoder, kind, source, n_classes, channels, **head)

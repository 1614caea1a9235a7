"""``plot_sample``: a PNG of what the model gets for one sample.

Rows: the HR image (RGB) beside its validity mask; the Sentinel-2 series as false colour
(NIR, red, green = B8, B4, B3) with each step's day of year; the Sentinel-1 series as a colour
composite (VV, VH, VV - VH); the per-pixel masks of both series (white = valid). Invalid or
padded steps are crossed out. Colours are stretched per channel over the valid pixels of the
whole series (2-98 %), so normalised values plot as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skysense.data import batch as B

_S2_FALSE_COLOUR = (6, 2, 1)  # B8, B4, B3 in the model's band order


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _one(sample: dict, index: int) -> dict:
    """The ``index``-th sample of a batch as numpy arrays (a single sample passes through)."""
    ref = next(sample[m] for m in B.MODALITIES if m in sample)
    batched = _np(ref).ndim == (4 if B.HR in sample and ref is sample[B.HR] else 5)
    out = {}
    for k, v in sample.items():
        if isinstance(v, (torch.Tensor, np.ndarray)):
            a = _np(v)
            out[k] = a[index] if batched and a.ndim >= 1 else a
    return out


def _stretch(x: np.ndarray, valid: np.ndarray | None, joint: bool = False) -> np.ndarray:
    """(..., C) -> [0, 1], 2-98 % of the valid pixels, per channel (or one range for all
    channels with ``joint``, which keeps an RGB image's colour balance)."""
    out = np.zeros_like(x, dtype=np.float32)
    chans = [slice(None)] if joint else [slice(c, c + 1) for c in range(x.shape[-1])]
    for c in chans:
        v = x[..., c][valid] if valid is not None and valid.any() else x[..., c].reshape(-1)
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [2, 98]) if v.size else (0.0, 1.0)
        out[..., c] = np.clip((x[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
    if valid is not None:
        # No-data pixels (zeros in every band, as the loaders write them) in black.
        out[~valid & (x == 0).all(-1)] = 0
    return out


def plot_sample(sample_or_batch: dict, path, *, index: int = 0, max_steps: int = 12, title=None):
    """Save a PNG of one sample of ``sample_or_batch`` (a batch, a views batch, or one sample).

    A views batch plots both views, one above the other. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    if B.VIEW1 in sample_or_batch:
        views = [(f"view {i + 1}", sample_or_batch[v]) for i, v in enumerate((B.VIEW1, B.VIEW2))]
    else:
        views = [("", sample_or_batch)]
    blocks = []
    for name, b in views:
        s = _one(b, index)
        rows = []
        if B.HR in s:
            rows.append("hr")
        for m in B.SERIES:
            if m in s:
                rows.append(m)
        rows += [f"mask_{m}" for m in B.SERIES if B.pixel_valid_key(m) in s]
        blocks.append((name, s, rows))
    ncols = max(
        [2] + [min(max_steps, s[m].shape[0]) for _, s, _ in blocks for m in B.SERIES if m in s]
    )
    nrows = sum(len(r) for _, _, r in blocks)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(1.6 * ncols, 5.0), 1.7 * nrows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    r = 0
    for name, s, rows in blocks:
        prefix = f"{name}: " if name else ""
        for row in rows:
            if row == "hr":
                img = np.moveaxis(s[B.HR], 0, -1)
                pv = s.get(B.HR_PIXEL_VALID)
                axes[r, 0].imshow(_stretch(img, pv, joint=True))
                doy = int(s.get(B.HR_DOY, 0))
                axes[r, 0].set_title(f"{prefix}HR RGB" + (f" doy {doy}" if doy else ""), fontsize=7)
                if pv is not None:
                    axes[r, 1].imshow(pv, cmap="gray", vmin=0, vmax=1)
                    axes[r, 1].set_title("HR valid pixels", fontsize=7)
                    axes[r, 1].axis("on")
                    axes[r, 1].set_xticks([])
                    axes[r, 1].set_yticks([])
                r += 1
            elif row in B.SERIES:
                m = row
                x = np.moveaxis(s[m], 1, -1)  # (T, h, w, C)
                valid = s.get(B.valid_key(m), np.ones(x.shape[0], bool))
                doy = s.get(B.doy_key(m), np.zeros(x.shape[0], int))
                pv = s.get(B.pixel_valid_key(m))
                keep = valid | (doy > 0)  # padding (no date, invalid) is not drawn
                x, valid, doy = x[keep], valid[keep], doy[keep]
                pv = pv[keep] if pv is not None else None
                T = min(max_steps, x.shape[0])
                if m == B.S2:
                    rgb = x[..., list(_S2_FALSE_COLOUR)]
                else:
                    rgb = np.concatenate([x[..., :1], x[..., 1:2], x[..., :1] - x[..., 1:2]], -1)
                sel = pv[:T] & valid[:T, None, None] if pv is not None else None
                rgb = _stretch(rgb[:T], sel)
                for t in range(T):
                    ax = axes[r, t]
                    ax.imshow(rgb[t])
                    label = "S2 NIR-R-G" if m == B.S2 else "S1 VV-VH-diff"
                    ax.set_title(
                        (f"{prefix}{label}\n" if t == 0 else "\n") + f"doy {int(doy[t])}",
                        fontsize=6,
                    )
                    if not valid[t]:
                        h, w = rgb.shape[1:3]
                        ax.plot([0, w - 1], [0, h - 1], "r-", lw=1)
                        ax.plot([0, w - 1], [h - 1, 0], "r-", lw=1)
                r += 1
            else:
                m = row[len("mask_") :]
                pv = s[B.pixel_valid_key(m)]
                keep = s.get(B.valid_key(m), np.ones(pv.shape[0], bool)) | (
                    s.get(B.doy_key(m), np.zeros(pv.shape[0], int)) > 0
                )
                pv = pv[keep]
                for t in range(min(max_steps, pv.shape[0])):
                    axes[r, t].imshow(pv[t], cmap="gray", vmin=0, vmax=1)
                    if t == 0:
                        axes[r, t].set_title(f"{prefix}{m.upper()} valid pixels", fontsize=6)
                r += 1
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

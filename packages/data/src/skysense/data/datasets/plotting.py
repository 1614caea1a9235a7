"""``plot_item``: a PNG of one dataset item as a person checks it (the image in colour, its
label, mask, change mask or boxes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from skysense.kernels.modalities import MODALITIES

IGNORE_INDEX = 255


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _stretch(x: np.ndarray) -> np.ndarray:
    """(H, W, C) -> [0, 1] per channel, 2-98 %."""
    out = np.zeros_like(x, dtype=np.float32)
    for c in range(x.shape[-1]):
        v = x[..., c][np.isfinite(x[..., c])]
        lo, hi = np.percentile(v, [2, 98]) if v.size else (0.0, 1.0)
        out[..., c] = np.clip((x[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
    return out


def preview(sample: dict, modality: str, sensor: str) -> np.ndarray:
    """(H, W, 3) float in [0, 1] of the first step of ``modality`` (de-normalised)."""
    from skysense.data.sensors import get_sensor

    spec = get_sensor(sensor)
    x = _np(sample[modality]).astype(np.float32)
    if modality != "hr":
        x = x[0]
    m = np.asarray(spec.mean, np.float32)[:, None, None]
    s = np.asarray(spec.std, np.float32)[:, None, None]
    raw = x * s + m
    if modality == "hr":
        return np.clip(raw.transpose(1, 2, 0) / 255.0, 0, 1)
    if modality == "s2":
        idx = [spec.model_bands.index(b) for b in ("B4", "B3", "B2")]
        return _stretch(raw[idx].transpose(1, 2, 0))
    vv, vh = raw[0], raw[1]
    return _stretch(np.stack([vv, vh, vv - vh], -1))


def plot_item(
    sample: dict,
    path,
    sensors: dict[str, str],
    classes: Sequence[str],
    task: str,
    title: str | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, np.ndarray, dict]] = []
    parts = [("t1", sample["t1"]), ("t2", sample["t2"])] if "t1" in sample else [("", sample)]
    for tag, s in parts:
        for m in MODALITIES:
            if m in s and m in sensors:
                name = f"{m} {tag}".strip()
                if m != "hr" and f"{m}_doy" in s:
                    d = int(_np(s[f"{m}_doy"])[0])
                    name += f" (doy {d if d else 'unknown'})"
                panels.append((name, preview(s, m, sensors[m]), {}))
    if "mask" in sample:
        mk = _np(sample["mask"]).astype(np.float32)
        mk[mk == IGNORE_INDEX] = np.nan
        panels.append(
            (
                "change" if task == "change" else "mask",
                mk,
                {"cmap": "tab20", "vmin": 0, "vmax": max(len(classes) - 1, 1)},
            )
        )
    label = ""
    if "label" in sample:
        lab = _np(sample["label"])
        if lab.ndim == 0:
            label = classes[int(lab)] if classes else str(int(lab))
        else:
            label = ", ".join(classes[k] for k in np.flatnonzero(lab > 0.5))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, img, kw) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if "boxes" in sample:
        ax = axes[0][0]
        for (x0, y0, x1, y1), k in zip(_np(sample["boxes"]), _np(sample["labels"])):
            ax.add_patch(
                plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1)
            )
            if classes:
                ax.text(x0, y0, classes[int(k)], color="yellow", fontsize=6)
    if "polygons" in sample:
        ax = axes[0][0]
        for poly in _np(sample["polygons"]):
            ax.add_patch(plt.Polygon(poly.reshape(4, 2), fill=False, color="cyan", lw=1))
    fig.suptitle(((title + ": ") if title else "") + label, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

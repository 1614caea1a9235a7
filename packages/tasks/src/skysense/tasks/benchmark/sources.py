"""Rows of features and labels for the probes, from a benchmark entry's data.

A *featuriser* turns inputs into feature vectors: a frozen encoder (pooled output for image
tasks, the source's deepest map at each pixel for dense tasks) or the spectral baseline
(per-band statistics of the image or of the pixel). :func:`feature_set` gives, for one entry
and one featuriser, a :class:`FeatureSet`: training rows with groups (whole scenes or spatial
blocks, for validation splits that do not leak neighbours) and test rows.

- image tasks (classification, multi-label: ``data=embedded``, ``shards`` and the public
  classification sets): one row per image; encoder rows are ``training.probe.pooled_features``
  (``features: pooled``) or :func:`downstream.features.pooled` of a named source; spectral rows
  are the per-band mean and std over the image (and its time steps) of each modality.
- dense tasks (segmentation, change: OSCD and the public segmentation sets): one row per
  sampled pixel (at most ``pixels_per_scene`` training pixels of each scene, half of them
  change pixels where there are enough; test: every labelled pixel, or a uniform sample of
  ``max_test_pixels``; change: a second, uniform sample of each training scene for
  validation, so the threshold is chosen at the true change rate); the encoder row is the source's map at the pixel's token (change:
  ``[f1, f2, |f1 - f2|]``), the spectral row the pixel's bands (series: mean and std over
  time; change: ``[x1, x2, x2 - x1]``).
- ``eolearn_slovenia``: see :mod:`skysense.tasks.benchmark.slovenia`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import Tensor

from skysense.kernels.modalities import MODALITIES
from skysense.tasks.downstream.datasets.common import IGNORE_INDEX, collate, to_device
from skysense.tasks.downstream.evaluation import window_of
from skysense.tasks.downstream.features import feature_maps, pooled

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """kind: classification | pixels | change | multilabel (see :mod:`probes`). x: (N, D)
    float32; y: (N,) int64 or (N, K) float32; groups: (N,) int64 or None; test_groups / test_group_names: the scene of each test row, for
    per-scene scores."""

    kind: str
    classes: list[str]
    train_x: Tensor
    train_y: Tensor
    train_groups: Tensor | None
    test_x: Tensor
    test_y: Tensor
    info: dict = field(default_factory=dict)
    test_groups: Tensor | None = None
    test_group_names: list[str] | None = None
    # (N,) bool: training rows sampled at the data's own class rates (None: all of them); the
    # others are class-balanced samples for fitting
    train_natural: Tensor | None = None


# ------------------------------------------------------------------ featurisers


def spectral_image(batch: dict) -> Tensor:
    """(B, 2 * sum of bands): per-band mean and std of each modality over space (and the
    valid time steps of a series)."""
    parts = []
    for m in MODALITIES:
        if m not in batch:
            continue
        x = batch[m].float()
        if x.ndim == 4:  # (B, C, H, W)
            x = x[:, None]
        valid = batch.get(f"{m}_valid")
        w = (
            valid.float()[:, :, None, None, None]
            if valid is not None
            else torch.ones(x.shape[:2] + (1, 1, 1))
        )
        n = (w.sum(1) * x.shape[-1] * x.shape[-2]).clamp_min(1.0)  # (B, 1, 1, 1)
        mean = (x * w).sum((1, 3, 4)) / n[:, :, 0, 0]
        var = ((x - mean[:, None, :, None, None]) ** 2 * w).sum((1, 3, 4)) / n[:, :, 0, 0]
        parts += [mean, var.clamp_min(0).sqrt()]
    return torch.cat(parts, 1)


@torch.no_grad()
def image_rows(featuriser, batches, features: str, device) -> tuple[Tensor, Tensor]:
    """Rows and labels of every batch: featuriser = an encoder module or "spectral"."""
    from skysense.tasks.training.probe import pooled_features

    xs, ys = [], []
    for b in batches:
        if featuriser == "spectral":
            xs.append(spectral_image(b))
        else:
            bd = to_device(b, device)
            out = featuriser(bd)
            f = pooled_features(out) if features == "pooled" else pooled(out, features, bd)
            xs.append(f.float().cpu())
        ys.append(b["label"].cpu())
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def token_map(encoder, sample: dict, source: str, window: int, device, batch: int = 4):
    """(C, h, w) float32 map of ``source`` over a whole scene (contract sample, unbatched), run
    tile by tile (``window`` px of the reference grid, zero-padded at the edges); returns the
    map and its stride in pixels."""
    ref = next(sample[m] for m in ("s2", "s1", "hr") if m in sample)
    h, w = ref.shape[-2:]
    tiles = [(t, left) for t in range(0, h, window) for left in range(0, w, window)]
    canvas, stride = None, None
    for i in range(0, len(tiles), batch):
        chunk = tiles[i : i + batch]
        b = to_device(collate([window_of(sample, t, left, window, w) for t, left in chunk]), device)
        fm = feature_maps(encoder(b), source, b)[-1].float().cpu()  # (n, C, s, s)
        if canvas is None:
            stride = window // fm.shape[-1]
            canvas = torch.zeros(fm.shape[1], -(-h // stride) + 1, -(-w // stride) + 1)
        for (t, left), f in zip(chunk, fm):
            r, c = t // stride, left // stride
            rr, cc = min(f.shape[-2], canvas.shape[1] - r), min(f.shape[-1], canvas.shape[2] - c)
            canvas[:, r : r + rr, c : c + cc] = f[:, :rr, :cc]
    return canvas, stride


def pixel_spectra(sample: dict, rows: Tensor, cols: Tensor) -> Tensor:
    """(N, D) the bands of the pixels (series: mean and std over the valid steps)."""
    parts = []
    for m in MODALITIES:
        if m not in sample:
            continue
        x = sample[m].float()
        if x.ndim == 3:
            x = x[None]
        v = x[:, :, rows, cols]  # (T, C, N)
        valid = sample.get(f"{m}_valid")
        wt = valid.float() if valid is not None else torch.ones(len(x))
        wt = wt[:, None, None] / wt.sum().clamp_min(1.0)
        mean = (v * wt).sum(0)
        parts.append(mean.T)
        if len(x) > 1:
            parts.append(((v - mean) ** 2 * wt).sum(0).clamp_min(0).sqrt().T)
    return torch.cat(parts, 1)


def pixel_rows(featuriser, scene, rows, cols, source, window, device, change: bool) -> Tensor:
    if change:
        a = pixel_rows(featuriser, _Pair(scene, "t1"), rows, cols, source, window, device, False)
        b = pixel_rows(featuriser, _Pair(scene, "t2"), rows, cols, source, window, device, False)
        return torch.cat([a, b, (b - a).abs() if featuriser != "spectral" else b - a], 1)
    if featuriser == "spectral":
        return pixel_spectra(scene.sample, rows, cols)
    fmap, stride = token_map(featuriser, scene.sample, source, window, device)
    return fmap[:, rows // stride, cols // stride].T.contiguous()


@dataclass
class _Pair:
    """One date of a change scene, seen as a scene."""

    scene: object
    date: str

    @property
    def sample(self):
        return self.scene.sample[self.date]


def sample_pixels(mask: Tensor, n: int | None, balance: bool, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of up to ``n`` labelled pixels (None: all), uniformly, or with ``balance``
    half of them from class 1 (change) where it has enough pixels."""
    flat = mask.flatten()
    lab = torch.nonzero(flat != IGNORE_INDEX).flatten()
    g = torch.Generator().manual_seed(seed)
    if n is not None and len(lab) > n:
        if balance:
            pos = lab[flat[lab] == 1]
            neg = lab[flat[lab] != 1]
            k = min(len(pos), n // 2)
            pos = pos[torch.randperm(len(pos), generator=g)[:k]]
            neg = neg[torch.randperm(len(neg), generator=g)[: n - k]]
            lab = torch.cat([pos, neg])
        else:
            lab = lab[torch.randperm(len(lab), generator=g)[:n]]
    w = mask.shape[-1]
    return lab // w, lab % w


def dense_rows(featuriser, scenes, cfg, device, n_per_scene, change: bool, balance: bool):
    """Rows, labels, scene ids and the ``natural`` flag of the sampled pixels of every scene.
    With ``balance``, each scene gives a class-balanced sample (natural False: what the probe
    fits) and a uniform one of the same size (natural True: where the L2 weight and the
    threshold are chosen, at the true change rate)."""
    xs, ys, gs, nat = [], [], [], []
    for i, sc in enumerate(scenes):
        rows, cols = sample_pixels(sc.mask, n_per_scene, balance, seed=i)
        flags = torch.full((len(rows),), not balance)
        if balance:
            r2, c2 = sample_pixels(sc.mask, n_per_scene, False, seed=10_000 + i)
            rows, cols = torch.cat([rows, r2]), torch.cat([cols, c2])
            flags = torch.cat([flags, torch.ones(len(r2), dtype=torch.bool)])
        xs.append(pixel_rows(featuriser, sc, rows, cols, cfg.source, cfg.window, device, change))
        ys.append(sc.mask[rows, cols].long())
        gs.append(torch.full((len(rows),), i, dtype=torch.long))
        nat.append(flags)
    return torch.cat(xs), torch.cat(ys), torch.cat(gs), torch.cat(nat)


# ------------------------------------------------------------------ entries -> rows


def _with(data_cfg, **kw):
    return OmegaConf.merge(data_cfg, kw)


def feature_set(entry, data_cfg, featuriser, device) -> FeatureSet:
    """The rows of ``entry`` (its ``data`` config composed in ``data_cfg``) for ``featuriser``
    (an encoder module, or "spectral")."""
    from skysense.tasks.downstream.data import build_task_data

    if data_cfg.name == "eolearn_slovenia":
        from skysense.tasks.benchmark.slovenia import slovenia_feature_set

        return slovenia_feature_set(entry, data_cfg, featuriser, device)
    src = entry.features
    test = build_task_data(data_cfg, 0, 0, None if src == "pooled" else src)
    train_split = data_cfg.get("split") or data_cfg.get("train_split") or "train"
    over = {"val_split": train_split}
    if "val_cities" in data_cfg:
        over["val_cities"] = data_cfg.get("train_cities")
    if "val_split_file" in data_cfg:
        over["val_split_file"] = data_cfg.get("split_file")
    train = build_task_data(_with(data_cfg, **over), 0, 0, None if src == "pooled" else src)
    kind = test.kinds[0]
    info = {"data_info_test": test.info, "data_info_train": train.info}
    if kind in ("classification", "multilabel"):
        bs = int(entry.batch_size)

        def batches(td):
            if td.eval_batches is not None:
                return td.eval_batches(bs)
            return [collate([td.eval[j] for j in range(i, min(i + bs, len(td.eval)))])
                    for i in range(0, len(td.eval), bs)]  # fmt: skip

        xt, yt = image_rows(featuriser, batches(train), src, device)
        xs, ys = image_rows(featuriser, batches(test), src, device)
        return FeatureSet(kind, test.classes, xt, yt, None, xs, ys, info)
    if kind in ("segmentation", "change"):
        change = kind == "change"
        dcfg = OmegaConf.create({"source": "s2" if src == "pooled" else src,
                                 "window": int(entry.window)})  # fmt: skip
        xt, yt, gt, nat = dense_rows(featuriser, train.eval, dcfg, device,
                                     int(entry.pixels_per_scene), change, change)  # fmt: skip
        xs, ys, gs, _ = dense_rows(featuriser, test.eval, dcfg, device,
                                   entry.get("max_test_pixels"), change, False)  # fmt: skip
        info["scenes"] = {"train": [s.name for s in train.eval],
                          "test": [s.name for s in test.eval]}  # fmt: skip
        k = "change" if change else "pixels"
        fs = FeatureSet(k, test.classes, xt, yt, gt, xs, ys, info, gs, info["scenes"]["test"])
        fs.train_natural = nat if change else None
        return fs
    raise NotImplementedError(f"benchmark probes on {kind} data ({data_cfg.name}) are not wired")

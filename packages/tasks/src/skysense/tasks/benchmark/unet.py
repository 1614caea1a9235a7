"""The U-Net-from-scratch baseline of dense tasks (segmentation, change detection): PANGAEA's
reference beside the foundation models, trained on the same data, crops, loss (class-weighted
cross-entropy) and number of steps as the entry's fine-tuning, evaluated by the same sliding
windows.

The network (Ronneberger et al. 2015's shape, small): three levels of two 3x3 conv + BatchNorm
+ ReLU, widths ``width * (1, 2, 4)``, max-pool down, transposed-conv up with skip
concatenation, a 1x1 classifier. Input: the task's modality as is (a series is averaged over
its valid steps); change pairs: both dates' channels concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skysense.tasks.downstream.features import temporal_mean


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def image_of(batch: Mapping, modality: str) -> Tensor:
    """(B, C, H, W) float: the modality's image, series averaged over ``{m}_valid``."""
    x = batch[modality].float()
    if x.ndim == 5:
        x = temporal_mean(x, batch.get(f"{modality}_valid"))
    return x


class UNet(nn.Module):
    """Args: in_channels (of one date), n_classes, modality (hr / s2 / s1), change (two dates),
    width. ``forward(batch) -> {"logits": (B, n_classes, H, W)}`` on the modality's grid."""

    def __init__(self, in_channels: int, n_classes: int, modality: str, change: bool,
                 width: int = 32):  # fmt: skip
        super().__init__()
        self.modality, self.change = modality, change
        c = in_channels * (2 if change else 1)
        w = (width, 2 * width, 4 * width)
        self.enc1, self.enc2, self.mid = _block(c, w[0]), _block(w[0], w[1]), _block(w[1], w[2])
        self.up2 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2)
        self.dec2 = _block(2 * w[1], w[1])
        self.up1 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2)
        self.dec1 = _block(2 * w[0], w[0])
        self.head = nn.Conv2d(w[0], n_classes, 1)

    def forward(self, batch: Mapping) -> dict:
        if self.change:
            x = torch.cat([image_of(batch["t1"], self.modality),
                           image_of(batch["t2"], self.modality)], 1)  # fmt: skip
        else:
            x = image_of(batch, self.modality)
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        x = F.pad(x, (0, pw, 0, ph))
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return {"logits": self.head(d1)[..., :h, :w]}


def unet_protocol(entry, base_cfg, seed: int, out_dir) -> dict:
    """Train and evaluate the U-Net on the entry's data with the fine-tuning budget, the same
    validation split, label fraction, early stopping and change threshold rule as the
    encoders' runs (:func:`protocols.train_over`)."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from skysense.tasks.benchmark.protocols import budget_steps, stop_record, train_over
    from skysense.tasks.downstream.data import build_task_data
    from skysense.tasks.downstream.datasets.common import collate
    from skysense.tasks.downstream.evaluation import evaluate_dense
    from skysense.tasks.downstream.holdout import carve
    from skysense.tasks.downstream.losses import TaskLoss
    from skysense.tasks.downstream.run import HEADLINE
    from skysense.tasks.downstream.trainer import EarlyStopping, train
    from skysense.tasks.downstream.validation import choose_threshold, score_fn
    from skysense.tasks.training.runtime import resolve_device, seed_everything

    cfg = OmegaConf.merge(base_cfg, {"seed": seed})
    kind = cfg.task.kind
    if kind not in ("segmentation", "change"):
        raise NotImplementedError(f"the U-Net baseline serves dense tasks, not {kind}")
    over = train_over(entry, base_cfg, "finetune", None, seed, Path(out_dir))
    cfg = OmegaConf.merge(cfg, {"trainer": over["trainer"], "task": over["task"]})
    steps = budget_steps(entry, cfg, seed) or int(cfg.trainer.max_steps)
    bs = int(cfg.trainer.batch_size)
    device = resolve_device(cfg.trainer.device, "trainer.device")
    seed_everything(seed)
    src = cfg.task.get("features")
    data = build_task_data(cfg.data, steps * bs, seed, src)
    if data.train_batches is not None:
        raise NotImplementedError("the U-Net baseline reads in-memory dense data only")
    tr = cfg.trainer
    val = None
    if tr.val_fraction > 0 or tr.label_fraction < 1:
        data, val = carve(data, cfg.data, steps * bs, seed, src, tr.val_fraction,
                          tr.label_fraction)  # fmt: skip
    example = collate([data.train[0]])
    one = example["t1"] if kind == "change" else example
    mods = [m for m in ("s2", "s1", "hr") if m in one]
    modality = src if src in mods else mods[0]
    torch.manual_seed(seed + 1)
    model = UNet(one[modality].shape[-3], len(data.classes), modality, kind == "change").to(device)
    lr = float(entry.get("unet_lr", 1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    weights = data.class_weights if cfg.task.get("class_weights") == "auto" else None
    loader = DataLoader(data.train, batch_size=bs, shuffle=False, collate_fn=collate,
                        drop_last=True)  # fmt: skip
    stopper = None
    if tr.eval_every and val is not None:
        stopper = EarlyStopping(score_fn(kind, val, cfg, device), int(tr.eval_every),
                                tr.get("patience"))  # fmt: skip
    hist = train(model, TaskLoss(kind, weights).to(device), kind, loader, opt, steps, lr,
                 0.0, 0, None, 50, device, desc="unet", stopper=stopper)  # fmt: skip
    ev = cfg.task.eval
    thr = None
    if kind == "change" and val is not None and cfg.task.threshold == "val":
        thr = choose_threshold(model, val, ev, device)
    scores, _, _ = evaluate_dense(model, kind, data.eval, len(data.classes), ev.window,
                                  ev.overlap, ev.batch_size, device,
                                  thr["threshold"] if thr else None)  # fmt: skip
    metric = HEADLINE[kind][0]
    v = scores.get(metric, math.nan)
    res = {
        "score": math.nan if v is None else float(v),
        "metric": metric,
        **stop_record(stopper.record(len(hist), steps) if stopper else None, hist),
        "scores": {k: v for k, v in scores.items() if k not in ("confusion_matrix", "per_scene")},
        "per_scene": scores.get("per_scene"),
        "steps": len(hist),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data_info": data.info,
        "label_fraction": float(tr.label_fraction),
    }
    if thr:
        res.update(threshold=thr["threshold"], validation_scenes=thr["val_scenes"],
                   val_pr_curve=thr["val_pr_curve"])  # fmt: skip
    return res

"""The fine-tuning loop: short, read top to bottom.

Each step: a batch, the forward, the task loss, backward, gradient clipping, AdamW with the
scheduled learning rate (warm-up + cosine, per-group layer-decay scales). Every ``log_every``
steps the loss goes to the log and to the history that the run's JSON and loss plot keep.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from skysense.tasks.downstream.datasets.common import to_device
from skysense.tasks.downstream.optim import lr_at, set_lr

log = logging.getLogger(__name__)


def forward_loss(model: nn.Module, loss_fn: nn.Module, kind: str, batch: Mapping) -> torch.Tensor:
    if kind == "detection":
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
        return loss_fn(model(batch["hr"], targets), batch)
    return loss_fn(model(batch), batch)


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    kind: str,
    batches: Iterable[Mapping],
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    log_every: int = 10,
    device: torch.device | str = "cpu",
    desc: str = "finetune",
) -> list[dict]:
    """Run ``max_steps`` optimizer steps over ``batches`` (at least that many). Returns the
    history: one ``{"step", "loss", "lr", "seconds"}`` per step."""
    model.train()
    history = []
    it = iter(batches)
    t0 = time.perf_counter()
    bar = tqdm(range(max_steps), desc=desc, unit="step", leave=False)
    for step in bar:
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(
                f"the training data ran out after {step} of {max_steps} steps"
            ) from None
        batch = to_device(batch, device)
        cur = lr_at(step, max_steps, lr, min_lr, warmup_steps)
        set_lr(optimizer, cur)
        loss = forward_loss(model, loss_fn, kind, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} (lr {cur:.2e})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        rec = {
            "step": step + 1,
            "loss": loss.item(),
            "lr": cur,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            log.info(
                "%s step %d/%d loss %.4f lr %.2e (%.1f s)",
                desc,
                step + 1,
                max_steps,
                rec["loss"],
                cur,
                rec["seconds"],
            )
    return history

"""The fine-tuning loop: short, read top to bottom.

Each step: a batch, the forward, the task loss, backward, gradient clipping, AdamW with the
scheduled learning rate (warm-up + cosine by default, or any ``lr_fn`` of the step, e.g.
PANGAEA's multi-step; per-group layer-decay scales). Every ``log_every`` steps the loss goes to
the log and to the history that the run's JSON and loss plot keep.

With an :class:`EarlyStopping`, the model is scored on a validation split every ``every``
steps (and at the last step); the run stops once ``patience`` evaluations in a row have not
improved on the best by more than ``min_delta``, and the weights of the best evaluation are
restored. The stopper keeps the evaluations, the best step and whether the run stopped early.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from skysense.tasks.downstream.datasets.common import to_device
from skysense.tasks.training.optim import set_lr_wd
from skysense.tasks.training.schedules import warmup_cosine

log = logging.getLogger(__name__)


def forward_loss(model: nn.Module, loss_fn: nn.Module, kind: str, batch: Mapping) -> torch.Tensor:
    if kind == "detection":
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
        for t, poly in zip(targets, batch.get("polygons") or ()):
            t["polygons"] = poly  # oriented boxes (M, 8), for the rotated-box branch
        return loss_fn(model(batch["hr"], targets), batch)
    return loss_fn(model(batch), batch)


class EarlyStopping:
    """Validation-based stopping.

    Args:
        score_fn: ``score_fn(model) -> float``, higher is better (the task's headline metric on
            the validation split; NaN counts as no improvement). Called with the model in eval
            mode; training mode is restored after.
        every: evaluate every ``every`` optimizer steps (and after the last step).
        patience: stop after this many evaluations without improvement (None: never stop
            early, but still restore the best weights).
        min_delta: an improvement must exceed the best by more than this.
    """

    def __init__(self, score_fn: Callable[[nn.Module], float], every: int,
                 patience: int | None = None, min_delta: float = 0.0):  # fmt: skip
        if every <= 0:
            raise ValueError(f"EarlyStopping: every must be > 0, not {every}")
        self.score_fn, self.every, self.patience, self.min_delta = (
            score_fn, int(every), patience, float(min_delta))  # fmt: skip
        self.evals: list[dict] = []
        self.best, self.best_step, self.best_state = -math.inf, None, None
        self.bad = 0
        self.stopped_early = False

    def __call__(self, model: nn.Module, step: int) -> bool:
        """Evaluate after ``step`` optimizer steps; True when training should stop."""
        was = model.training
        model.eval()
        v = float(self.score_fn(model))
        model.train(was)
        self.evals.append({"step": step, "val": v})
        if math.isfinite(v) and (self.best_step is None or v > self.best + self.min_delta):
            self.best, self.best_step, self.bad = v, step, 0
            # What training can change: trainable parameters and every buffer (a frozen
            # encoder, most of a large model, is not copied at each improvement).
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            self.best_state = {k: t.detach().to("cpu", copy=True)
                               for k, t in model.state_dict().items() if k not in frozen}  # fmt: skip
        else:
            self.bad += 1
        log.info("validation at step %d: %.4f (best %.4f at step %s)", step, v, self.best,
                 self.best_step)  # fmt: skip
        if self.patience is not None and self.bad >= self.patience:
            self.stopped_early = True
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the weights of the best evaluation (nothing when none was finite)."""
        if self.best_state is not None:
            missing, unexpected = model.load_state_dict(self.best_state, strict=False)
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            if unexpected or set(missing) - frozen:
                raise RuntimeError(
                    f"EarlyStopping.restore: the snapshot does not fit the model (missing "
                    f"{sorted(set(missing) - frozen)[:3]}, unexpected {unexpected[:3]})"
                )

    def record(self, steps_run: int, budget: int) -> dict:
        """What the run's JSON keeps: the evaluations, the best, and how the run ended."""
        return {
            "evals": self.evals,
            "best_step": self.best_step,
            "best_val": self.best if self.best_step is not None else None,
            "steps_run": steps_run,
            "budget": budget,
            "stopped_early": self.stopped_early and steps_run < budget,
            "patience": self.patience,
            "every": self.every,
        }


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
    lr_fn: Callable[[int], float] | None = None,
    stopper: EarlyStopping | None = None,
) -> list[dict]:
    """Run up to ``max_steps`` optimizer steps over ``batches`` (at least that many). ``lr_fn``:
    the base lr of a step (None: warm-up + cosine from ``lr`` to ``min_lr``); ``stopper``: see
    :class:`EarlyStopping` (the best weights are restored when it is given). Returns the
    history: one ``{"step", "loss", "lr", "seconds"}`` per step run."""
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
        if lr_fn is not None:
            cur = lr_fn(step)
        else:
            cur = warmup_cosine(step, max_steps, warmup_steps, lr, min_lr)
        set_lr_wd(optimizer, cur)
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
        due = stopper is not None and ((step + 1) % stopper.every == 0 or step + 1 == max_steps)
        if due and stopper(model, step + 1):
            if step + 1 < max_steps:
                log.info("%s: early stop at step %d (best %.4f at step %d)", desc, step + 1,
                         stopper.best, stopper.best_step)  # fmt: skip
            break
    bar.close()
    if stopper is not None:
        stopper.restore(model)
    return history

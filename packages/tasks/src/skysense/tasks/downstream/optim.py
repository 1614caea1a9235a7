"""Optimiser of fine-tuning: AdamW with layer-wise learning-rate decay, and its schedule.

Layer-wise lr decay (BEiT, the paper's fine-tuning recipe: decay 0.9) scales the lr of an
encoder parameter at depth ``i`` of ``L`` by ``decay ** (L + 1 - i)``: the head trains at the
full lr, the patch embeddings at the smallest. Depth comes from the parameter's name, in the
order the modules were registered (their forward order):

- within a branch (the first name component: ``hr_encoder``, ``s2_encoder``, ``fusion``...),
  each numbered block (an index after ``blocks`` / ``layers`` / ``stages``, e.g.
  ``stages.2.blocks.1``, ``blocks.7``; a Swin stage's patch merging is ``stages.2``) is one
  depth; parameters before the first block (patch embedding, position tables, tokens) are depth
  0, those after the last (final norms) the last depth + 1;
- the per-modality encoders run in parallel and share depths; grid-alignment branches (names
  starting with "grid") come next, all at one depth; then the branches that run after them
  (names with "fusion", "temporal", "geo"), in registration order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

_INT = re.compile(r"^\d+$")
_CONTAINERS = ("blocks", "layers", "layer", "stages", "block", "resblocks")
_LATE = ("fusion", "temporal", "geo")
# Never decayed: position / date tables, learned temperatures and tokens, norms and biases.
_NO_DECAY = ("pos_embed", "position", "logit_scale", "dtpe", "ctpe", "token", "prototypes")


def _block_key(name: str) -> str | None:
    parts = name.split(".")
    idx = [
        i
        for i, p in enumerate(parts[:-1])
        if _INT.match(p) and i > 0 and parts[i - 1].lower() in _CONTAINERS
    ]
    return ".".join(parts[: idx[-1] + 1]) if idx else None


def encoder_depths(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each encoder parameter (by name) and the largest depth."""
    names = [n for n, _ in encoder.named_parameters()]
    branches: dict[str, list[str]] = {}
    for n in names:
        branches.setdefault(n.split(".")[0], []).append(n)
    local: dict[str, int] = {}
    branch_max: dict[str, int] = {}
    for b, ns in branches.items():
        order: dict[str, int] = {}
        for n in ns:
            k = _block_key(n)
            if k is not None and k not in order:
                order[k] = len(order) + 1
        seen_block = False
        last = len(order)
        for n in ns:
            k = _block_key(n)
            if k is not None:
                seen_block = True
                local[n] = order[k]
            else:
                local[n] = last + 1 if seen_block else 0
        branch_max[b] = max((local[n] for n in ns), default=0)
    grid = [b for b in branches if b.lower().startswith("grid")]
    late = [b for b in branches if b not in grid and any(t in b.lower() for t in _LATE)]
    early = [b for b in branches if b not in grid and b not in late]
    acc = max((branch_max[b] for b in early), default=0) + 1
    late_offset = {b: acc for b in grid}
    if grid:
        acc += max(branch_max[b] for b in grid) + 1
    for b in late:  # registration order of the late branches is their order in the forward
        late_offset[b] = acc
        acc += branch_max[b] + 1
    depth = {n: local[n] + late_offset.get(n.split(".")[0], 0) for n in names}
    return depth, max(depth.values(), default=0)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    encoder_attr: str = "encoder",
) -> list[dict]:
    """AdamW parameter groups: per depth an lr scale (``lr_scale``), weight decay off for 1-D
    parameters and the tables of :data:`_NO_DECAY`. Frozen parameters are left out.

    Args:
        model: the task model; its encoder is found as the submodule named ``encoder_attr``
            anywhere in the tree (the detector nests it).
        lr: base (head) learning rate.
        weight_decay: AdamW weight decay of the decayed parameters.
        layer_decay: 1.0 switches layer-wise decay off.
    """
    enc_prefix = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == encoder_attr:
            enc_prefix = name + "."
            encoder = module
            break
    depth, top = encoder_depths(encoder) if enc_prefix else ({}, 0)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if enc_prefix and name.startswith(enc_prefix):
            d = depth[name[len(enc_prefix) :]]
            scale = layer_decay ** (top + 1 - d)
        else:
            scale = 1.0
        decay = p.ndim > 1 and not any(t in name.lower() for t in _NO_DECAY)
        g = groups.setdefault(
            (scale, decay),
            {"params": [], "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0},
        )
        g["params"].append(p)
    for g in groups.values():
        g["lr"] = lr * g["lr_scale"]
    return sorted(groups.values(), key=lambda g: g["lr_scale"])


def build_optimizer(groups: Iterable[dict], lr: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(groups), lr=lr, betas=tuple(betas))


def lr_at(step: int, max_steps: int, base_lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then a cosine decay to ``min_lr``
    at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

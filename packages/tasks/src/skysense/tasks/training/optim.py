"""AdamW with parameter groups: no weight decay on norms, biases, tokens, tables and scales, and
an optional layer-wise learning-rate decay.

Layer-wise decay gives parameters near the input a smaller learning rate: a parameter at depth
``d`` of ``D`` (0 = embeddings, D = the heads) gets ``lr * decay ** (D - d)``. Depth comes from
the parameter's name (:func:`layer_depth`), so it works for any model that numbers its blocks
(``...blocks.<i>...``, ``...layers.<i>...``), per tower.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

_NO_DECAY = re.compile(
    r"(\.bias$|norm|\.ln|token|pos_embed|dtpe|logit_scale|rel_pos|cpb|prototypes|\.gamma$)"
)
_BLOCK = re.compile(r"^(.*?)\.(?:blocks|layers)\.(\d+)\.")
_STEM = re.compile(r"(patch_embed|embed|dtpe|cls_token|extra_token|mask_token|absolute_pos)")


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """True for parameters that take no weight decay: 1-d tensors and named exceptions."""
    return p.ndim <= 1 or bool(_NO_DECAY.search(name))


def relative_depths(names: list[str]) -> tuple[dict[str, float], int]:
    """Relative depth in [0, 1] of each parameter name, and the largest tower's block count.

    A tower is the prefix before ``.blocks.<i>.`` / ``.layers.<i>.``; blocks of one tower are
    numbered in the order they appear (nested stages flatten in order, as Swin's stages do).
    Block ``j`` of a tower of ``n`` blocks sits at ``(j + 1) / (n + 1)``; stems and embeddings
    at 0; everything else (final norms, necks, heads) at 1.
    """
    towers: dict[str, list[str]] = defaultdict(list)
    where: dict[str, tuple[str, str]] = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            # The tower is everything before the first numbered block container.
            tower = m.group(1).split(".stages.")[0].split(".layers.")[0]
            block = n[: m.end()]
            if block not in towers[tower]:
                towers[tower].append(block)
            where[n] = (tower, block)
    depth = {}
    for n in names:
        if n in where:
            tower, block = where[n]
            blocks = towers[tower]
            depth[n] = (blocks.index(block) + 1) / (len(blocks) + 1)
        else:
            depth[n] = 0.0 if _STEM.search(n) else 1.0
    return depth, max((len(b) for b in towers.values()), default=0)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Parameter groups for AdamW. Each group carries ``lr_scale`` (layer decay: a parameter at
    relative depth r gets ``layer_decay ** (L * (1 - r))``, L the deepest tower's block count)
    and ``wd_scale`` (0 or 1) that the loop multiplies into the scheduled values."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth, n_blocks = relative_depths([n for n, _ in named])
    groups: dict[tuple[float, float], list[torch.Tensor]] = defaultdict(list)
    for n, p in named:
        wd = 0.0 if is_no_decay(n, p) else 1.0
        scale = 1.0
        if layer_decay != 1.0:
            scale = layer_decay ** ((n_blocks + 1) * (1.0 - depth[n]))
        groups[(round(scale, 6), wd)].append(p)
    return [
        {"params": ps, "lr_scale": s, "wd_scale": wd, "weight_decay": weight_decay * wd}
        for (s, wd), ps in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` of ``model`` from the ``optim`` config group."""
    groups = param_groups(model, cfg.weight_decay, cfg.get("layer_decay", 1.0))
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )


def set_lr_wd(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Apply the scheduled learning rate and weight decay to every group, with its scales."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)

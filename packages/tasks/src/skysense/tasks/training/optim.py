"""AdamW parameter groups of pre-training and fine-tuning: one no-decay rule, one layer-decay
depth rule, one learning-rate scaling rule.

No weight decay (:func:`is_no_decay`) on 1-d tensors (norms, biases, scales) and on named
tables and tokens: position embeddings, date encodings (``dtpe``), class / extra / mask tokens,
learned temperatures (``logit_scale``), relative position tables and Swin-V2's continuous
position-bias MLP (``cpb_mlp``, no decay as in Swin-V2 and timm), prototypes and layer-scale
``gamma``.

Layer-wise learning-rate decay (BEiT; the paper's fine-tuning recipe uses 0.9) scales the lr of
an encoder parameter at depth ``d`` by ``layer_decay ** (top + 1 - d)``, ``top`` being the
deepest encoder depth: everything outside the encoder (heads, projections) trains at the full
lr, the patch embeddings at the smallest. Depth follows SkySense's forward order
(:func:`encoder_depths`): the spatial encoders of the modalities run side by side and share
depths; the grid alignment comes after the deepest of them; the fusion encoder (and the other
branches that read the fused tokens: temporal, geo-context) comes after that. A fusion block is
therefore deeper than every spatial block, as its input is their output.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from skysense.tasks.errors import ConfigError

_NO_DECAY = re.compile(
    r"(\.bias$|norm|\.ln|token|pos_embed|position|dtpe|ctpe|logit_scale|rel_pos|cpb"
    r"|prototypes|\.gamma$)"
)
_INT = re.compile(r"^\d+$")
_CONTAINERS = ("blocks", "layers", "layer", "stages", "block", "resblocks")
# Branches that run after the grid alignment, on the fused tokens.
_LATE = ("fusion", "temporal", "geo")


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """True for parameters that take no weight decay: 1-d tensors and the named tables."""
    return p.ndim <= 1 or bool(_NO_DECAY.search(name.lower()))


def _block_key(name: str) -> str | None:
    """The name of the numbered block holding parameter ``name`` (its innermost index after a
    block container: ``stages.2.blocks.1``; a Swin stage's patch merging is ``stages.2``)."""
    parts = name.split(".")
    idx = [
        i
        for i, p in enumerate(parts[:-1])
        if _INT.match(p) and i > 0 and parts[i - 1].lower() in _CONTAINERS
    ]
    return ".".join(parts[: idx[-1] + 1]) if idx else None


def encoder_depths(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each encoder parameter (by name, relative to ``encoder``) and the deepest.

    Within a branch (the first name component: ``hr_encoder``, ``s2_encoder``, ``fusion``...)
    each numbered block is one depth, in registration (forward) order; parameters before the
    first block (patch embedding, position tables, tokens) are depth 0, those after the last
    (final norms) the last block's depth + 1. Branches then stack in forward order: spatial
    encoders in parallel from 0, the grid-alignment branches (names starting with "grid") at
    one depth after them, then each late branch (names with "fusion", "temporal", "geo") in
    registration order.
    """
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
        for n in ns:
            k = _block_key(n)
            if k is not None:
                seen_block = True
                local[n] = order[k]
            else:
                local[n] = len(order) + 1 if seen_block else 0
        branch_max[b] = max(local[n] for n in ns)
    grid = [b for b in branches if b.lower().startswith("grid")]
    late = [b for b in branches if b not in grid and any(t in b.lower() for t in _LATE)]
    early = [b for b in branches if b not in grid and b not in late]
    acc = max((branch_max[b] for b in early), default=0) + 1
    offset = {b: acc for b in grid}
    if grid:
        acc += max(branch_max[b] for b in grid) + 1
    for b in late:
        offset[b] = acc
        acc += branch_max[b] + 1
    depth = {n: local[n] + offset.get(n.split(".")[0], 0) for n in names}
    return depth, max(depth.values(), default=0)


def _find_encoder(model: nn.Module, attr: str) -> tuple[str, nn.Module] | None:
    """The first submodule named ``attr`` (at any nesting: the detector nests the encoder)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == attr:
            return name + ".", module
    return None


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, encoder_attr: str = "encoder"
) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters (frozen ones are left out).

    Each group carries ``lr_scale`` (the layer-decay factor, see the module docstring) and
    ``wd_scale`` (0 or 1) that :func:`set_lr_wd` multiplies into the scheduled values, and
    ``weight_decay`` = ``weight_decay * wd_scale``. Groups come by increasing ``lr_scale``,
    ties in the order their first parameter is registered.

    Args:
        model: the trained module; its encoder is the submodule named ``encoder_attr``.
        weight_decay: AdamW weight decay of the decayed parameters.
        layer_decay: 1.0 switches layer-wise decay off; any other value needs the encoder.
    """
    scale_of = {}
    if layer_decay != 1.0:
        found = _find_encoder(model, encoder_attr)
        if found is None:
            raise ValueError(
                f"layer_decay={layer_decay} needs the encoder as a submodule named "
                f"'{encoder_attr}' of {type(model).__name__}"
            )
        prefix, encoder = found
        depth, top = encoder_depths(encoder)
        scale_of = {prefix + n: layer_decay ** (top + 1 - d) for n, d in depth.items()}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = scale_of.get(name, 1.0)
        wd = 0.0 if is_no_decay(name, p) else 1.0
        g = groups.setdefault(
            (scale, wd),
            {"params": [], "lr_scale": scale, "wd_scale": wd, "weight_decay": weight_decay * wd},
        )
        g["params"].append(p)
    return sorted(groups.values(), key=lambda g: g["lr_scale"])


def build_optimizer(
    model: nn.Module, cfg, lr: float | None = None, layer_decay: float | None = None
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model`` from the ``optim`` config (weight_decay,
    layer_decay, betas). ``lr`` (default ``cfg.lr``) and ``layer_decay`` (default
    ``cfg.layer_decay``) override the config's; the loops set each step's lr and weight decay
    with :func:`set_lr_wd`."""
    if layer_decay is None:
        layer_decay = cfg.get("layer_decay", 1.0)
    lr = float(cfg.lr if lr is None else lr)
    groups = param_groups(model, cfg.weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def set_lr_wd(opt: torch.optim.Optimizer, lr: float, wd: float | None = None) -> None:
    """Apply the scheduled learning rate (and weight decay, unless None: then each group keeps
    its own) to every group, times the group's ``lr_scale`` / ``wd_scale``."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if wd is not None:
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)


def scaled_lr(ocfg, batch_size: int) -> float:
    """The peak learning rate for a global batch of ``batch_size``: ``optim.lr`` (the lr at
    ``optim.ref_batch``, default 256) as is (``lr_scaling: none``), times ``batch /
    ref_batch`` (linear) or its square root (sqrt)."""
    rule = ocfg.get("lr_scaling", "none")
    lr = float(ocfg.lr)
    if rule == "none":
        return lr
    ref = ocfg.get("ref_batch", 256)
    if rule not in ("linear", "sqrt"):
        raise ConfigError("optim.lr_scaling", f"'{rule}' is not one of none, linear, sqrt")
    if not ref or ref <= 0:
        raise ConfigError("optim.ref_batch", f"must be a positive batch size, got {ref!r}")
    ratio = batch_size / float(ref)
    return lr * ratio if rule == "linear" else lr * math.sqrt(ratio)

"""Activation checkpointing per block, behind a flag."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def run_block(block: Callable[..., torch.Tensor], *args, enabled: bool) -> torch.Tensor:
    """``block(*args)``, recomputed in the backward pass instead of stored when ``enabled``.

    Only where autograd records the forward (training with gradients) does checkpointing save
    anything, so inference runs the block directly. The non-reentrant variant keeps the RNG
    state, so a block's drop path draws the same samples in the recompute.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)

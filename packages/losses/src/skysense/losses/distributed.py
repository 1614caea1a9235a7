"""The few torch.distributed calls the losses make, in one place.

Every collective here is called the same number of times on every process whatever its local
batch holds (a modality absent on one process but present on another must not deadlock), so the
callers reduce fixed-size tensors, with zeros where they have nothing to add.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (``op`` "sum" or "max") when distributed; else ``t``."""
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t

"""Distributed set-up through torch.distributed (no home-made launcher): ``torchrun`` starts the
processes; gloo on the CPU, NCCL on GPUs; DDP or FSDP (``fully_shard``) wrapping."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from skysense.tasks.training.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun; a single process otherwise."""
    device = resolve_device(device_name, "trainer.device")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, command: str, argv: list[str]) -> int:
    """Re-run ``skysense <command> argv`` under torchrun with ``nproc`` processes on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "skysense.tasks.cli",
        command,
        *argv,
    ]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    env = dict(os.environ)
    # torchrun sets OMP_NUM_THREADS=1 unless told: share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def wrap(module: nn.Module, strategy: str, info: DistInfo, find_unused: bool = True) -> nn.Module:
    """Wrap the trainable module for ``strategy`` (ddp or fsdp) when distributed."""
    if not info.distributed:
        return module
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            module, device_ids=ids, find_unused_parameters=find_unused
        )
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        # Shard every transformer block on its own, then the rest at the root.
        for m in module.modules():
            if m is not module and type(m).__name__.endswith(("Block", "Layer")):
                fully_shard(m, mesh=mesh)
                # FSDP gathers the parameters around ``forward`` only: other entry points
                # (the fusion's last block runs ``forward_head``) would see the shards.
                for name in forward_methods(m):
                    register_fsdp_forward_method(m, name)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"trainer.strategy: unknown '{strategy}' (ddp or fsdp)")


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of an FSDP module (FSDP keeps the root's after forward; the
    teacher, which never runs backward, must be resharded before its EMA reads the shards)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def forward_methods(module: nn.Module) -> list[str]:
    """Names of ``module``'s extra forward entry points (``forward_<something>`` methods)."""
    return sorted(
        n
        for n in dir(type(module))
        if n.startswith("forward_") and callable(getattr(type(module), n, None))
    )


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each key's value averaged over the processes (one all-gather of the small dict; a key
    that a process lacks, such as the loss term of a modality absent from its batch, counts as
    0 there, as it does in the averaged gradient). A copy of ``values`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: float(v) for k, v in values.items()})
    keys = dict.fromkeys(k for g in gathered for k in g)  # in order of first appearance
    return {k: sum(g.get(k, 0.0) for g in gathered) / len(gathered) for k in keys}

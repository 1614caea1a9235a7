"""torch.distributed helpers of the loss ops: gathers and reductions that are no-ops in one
process, and an all-gather whose backward sums every rank's gradient for this rank's slice."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_and_rank() -> tuple[int, int]:
    if not is_distributed():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def check_same_rows(x: torch.Tensor, what: str) -> None:
    """all_gather needs the same number of rows on every rank: say so clearly when not."""
    world, _ = world_and_rank()
    if world == 1:
        return
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    got = [int(s) for s in sizes]
    if len(set(got)) != 1:
        raise ValueError(f"{what}: every rank must hold the same number of rows, got {got}")


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...) in rank order, without gradient."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); returns x."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max_(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def rank_slice(x: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's n rows of a gathered (world * n, ...) tensor."""
    _, rank = world_and_rank()
    return x[rank * n : (rank + 1) * n]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, g):
        # Every rank's loss may depend on every slice: sum the gradients, keep ours.
        g = all_reduce_sum_(g.contiguous().clone())
        return rank_slice(g, ctx.n)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (world * n, ...); the backward sums all ranks' gradients of this rank's rows."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)

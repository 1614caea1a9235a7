"""The distributed loss ops in 2 gloo processes on the CPU against one process on the
concatenated batch: info_nce(gather=True) (loss and gradients), Sinkhorn-Knopp (one problem
and grouped)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

WORLD = 2
N_LOCAL, D, K = 13, 8, 29


def _global_inputs():
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(WORLD * N_LOCAL, D, dtype=torch.float64, generator=g)
    b = torch.randn(WORLD * N_LOCAL, D, dtype=torch.float64, generator=g)
    scores = torch.randn(WORLD * N_LOCAL, K, dtype=torch.float64, generator=g) * 0.5
    return a, b, scores


def _worker(rank, port, backends):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from skysense.kernels import (
            force_backend,
            info_nce,
            sinkhorn_knopp,
        )
        from skysense.kernels.losses import info_nce_reference, sinkhorn_knopp_reference

        a, b, scores = _global_inputs()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)

        # One process on the concatenated batch.
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        full = info_nce_reference(ag, bg, 0.3)
        full.backward()

        for backend in backends:
            # The Triton kernels (interpreter) take fp32: same check at fp32 accuracy.
            dt, tol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, 1e-12)
            al = a[rows].to(dt).requires_grad_()
            bl = b[rows].to(dt).requires_grad_()
            with force_backend("info_nce", backend):
                loss = info_nce(al, bl, 0.3, gather=True)
            loss.backward()
            mean = loss.detach().double()
            dist.all_reduce(mean)
            mean /= WORLD
            assert torch.allclose(mean, full.detach(), atol=tol), (backend, mean, full)
            # DDP averages gradients over ranks: what reaches our rows / WORLD is the full grad.
            assert torch.allclose(al.grad.double() / WORLD, ag.grad[rows], atol=tol), backend
            assert torch.allclose(bl.grad.double() / WORLD, bg.grad[rows], atol=tol), backend

        got = sinkhorn_knopp(scores[rows], 3, 0.05, distributed=True)
        want = sinkhorn_knopp_reference(scores, 3, 0.05)[rows]
        assert torch.allclose(got, want, atol=1e-12), "sinkhorn"

        # Grouped: three groups whose rows are spread over both ranks, a fourth with none.
        groups = torch.arange(WORLD * N_LOCAL) % 3
        want = sinkhorn_knopp_reference(scores, 3, 0.05, groups, 4)[rows]
        for backend in (b for b in backends if b != "reference"):  # reference: one process
            dt, tol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, 1e-12)
            with force_backend("sinkhorn_knopp", backend):
                got = sinkhorn_knopp(
                    scores[rows].to(dt), 3, 0.05, distributed=True, groups=groups[rows], n_groups=4
                )
            assert torch.allclose(got.double(), want, atol=tol), ("grouped sinkhorn", backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.unit
@pytest.mark.slow
def test_gather_and_sinkhorn_across_two_gloo_processes():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from skysense.kernels import dispatch

    backends = ["chunked", "reference"]
    if dispatch.triton_unavailable_reason("cpu") is None:  # the interpreter: spawned workers
        backends.append("triton")  # inherit TRITON_INTERPRET from tests/conftest.py
    mp.spawn(_worker, args=(free_port(), tuple(backends)), nprocs=WORLD, join=True)

"""Helpers of the kernel tests: float64 references on the CPU, poisoned outputs."""

from __future__ import annotations

import pytest
import torch


def assert_close(got, want, atol, rtol, what):
    got = got.detach().double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten element?)"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds atol {atol}, rtol {rtol}"


@pytest.fixture
def triton_cpu():
    """The triton tier forces the Triton kernels on CPU tensors under the interpreter."""
    from skysense.kernels import dispatch

    reason = dispatch.triton_unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)
    with dispatch.poison_outputs():
        yield

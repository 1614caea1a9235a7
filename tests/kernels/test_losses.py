"""The loss ops against naive PyTorch (materialised matrices) in float64: the chunked backend
with blocks small enough to take several, and the Triton kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from skysense.kernels import (
    dispatch,
    force_backend,
    info_nce,
    last_backend,
    prototype_center_update,
    prototype_cross_entropy,
    sinkhorn_knopp,
)
from skysense.kernels.losses import (
    info_nce_reference,
    prototype_cross_entropy_reference,
    sinkhorn_knopp_reference,
)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows/prototypes, so every size below runs over several of them."""
    monkeypatch.setattr(dispatch, "_BLOCK_ELEMS", 64)


def _nce_case(n, d, dtype, backend, temperature, atol, rtol):
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    with force_backend("info_nce", backend):
        loss = info_nce(a, b, temperature)
    assert last_backend("info_nce") == backend
    loss.backward()
    ad, bd = (t.detach().double().requires_grad_() for t in (a, b))
    ref = info_nce_reference(ad, bd, temperature)
    ref.backward()
    assert_close(loss, ref, atol, rtol, f"info_nce {backend} loss")
    assert_close(a.grad, ad.grad, atol, rtol, f"info_nce {backend} grad a")
    assert_close(b.grad, bd.grad, atol, rtol, f"info_nce {backend} grad b")


def _proto_case(n, d, k, dtype, backend, teacher_weight, center, atol, rtol):
    sx = torch.randn(n, d).to(dtype).requires_grad_()
    tx = torch.randn(n, d).to(dtype)
    w = (torch.randn(k, d) / d**0.5).to(dtype).requires_grad_()
    tw = (torch.randn(k, d) / d**0.5).to(dtype) if teacher_weight else None
    c = torch.randn(k) * 0.1 if center else None
    with force_backend("prototype_cross_entropy", backend):
        loss = prototype_cross_entropy(sx, tx, w, tw, c, 0.1, 0.04)
    assert last_backend("prototype_cross_entropy") == backend
    loss.backward()
    sxd, wd = (t.detach().double().requires_grad_() for t in (sx, w))
    ref = prototype_cross_entropy_reference(
        sxd, tx.double(), wd, None if tw is None else tw.double(),
        None if c is None else c.double(), 0.1, 0.04,
    )  # fmt: skip
    ref.backward()
    assert_close(loss, ref, atol, rtol, f"prototype {backend} loss")
    assert_close(sx.grad, sxd.grad, atol, rtol, f"prototype {backend} grad student_x")
    assert_close(w.grad, wd.grad, atol, rtol, f"prototype {backend} grad weight")


# --- chunked backend, float64, exact up to rounding --------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("n, d", [(1, 3), (7, 5), (49, 33), (257, 17)])
def test_info_nce_chunked_float64(small_blocks, n, d):
    _nce_case(n, d, torch.float64, "chunked", 0.07, 1e-10, 1e-9)


@pytest.mark.unit
def test_info_nce_chunked_float32_and_default_dispatch():
    a, b = torch.randn(33, 16), torch.randn(33, 16)
    loss = info_nce(a, b, 0.2)
    assert last_backend("info_nce") == "chunked"
    assert loss.dtype == torch.float32
    assert_close(loss, info_nce_reference(a.double(), b.double(), 0.2), 1e-5, 1e-5, "loss")


@pytest.mark.unit
@pytest.mark.parametrize("n, d, k", [(1, 4, 5), (7, 9, 37), (49, 33, 300)])
@pytest.mark.parametrize("teacher_weight, center", [(False, False), (True, True), (False, True)])
def test_prototype_chunked_float64(small_blocks, n, d, k, teacher_weight, center):
    _proto_case(n, d, k, torch.float64, "chunked", teacher_weight, center, 1e-10, 1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("n, k", [(1, 5), (7, 3), (49, 300)])
@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_sinkhorn_chunked_float64(n, k, n_iters):
    scores = torch.randn(n, k, dtype=torch.float64) * 0.5
    got = sinkhorn_knopp(scores, n_iters, 0.05)
    assert last_backend("sinkhorn_knopp") == "chunked"
    assert_close(got, sinkhorn_knopp_reference(scores, n_iters, 0.05), 1e-12, 1e-9, "sinkhorn")
    if n_iters:
        assert_close(got.sum(1), torch.ones(n, dtype=torch.float64), 1e-9, 0, "row sums")


@pytest.mark.unit
def test_center_update_matches_materialised_logits():
    tx, w = torch.randn(37, 12, dtype=torch.float64), torch.randn(101, 12, dtype=torch.float64)
    center = torch.randn(1, 101, dtype=torch.float64)
    want = 0.9 * center + 0.1 * (tx @ w.t()).mean(0, keepdim=True)
    got = prototype_center_update(tx, center.clone(), w, momentum=0.9)
    assert_close(got, want, 1e-12, 1e-10, "center")


@pytest.mark.unit
def test_loss_input_errors():
    with pytest.raises(ValueError, match=r"both be \(N, d\)"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"weight must be \(K, d=3\)"):
        prototype_cross_entropy(torch.randn(4, 3), torch.randn(4, 3), torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"scores must be \(N, K\)"):
        sinkhorn_knopp(torch.randn(4))
    with (
        force_backend("info_nce", "triton"),
        pytest.raises(RuntimeError, match="fp32, fp16 or bf16"),
    ):
        info_nce(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))


# --- Triton kernels under the interpreter -----------------------------------------------------

_TRITON_CASES = [
    pytest.param(n, d, dt, id=f"N{n}-d{d}-{str(dt)[6:]}")
    for i, (n, dt) in enumerate(
        (n, dt) for n in (1, 7, 49, 64, 257) for dt in (torch.float32, torch.float16)
    )
    for d in [(32, 44, 64)[i % 3]]
]
_TRITON_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 2e-2)}


@pytest.mark.triton
@pytest.mark.parametrize("n, d, dtype", _TRITON_CASES)
def test_info_nce_triton(triton_cpu, n, d, dtype):
    _nce_case(n, d, dtype, "triton", 0.1, *_TRITON_TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("n, d, dtype", _TRITON_CASES)
def test_prototype_triton(triton_cpu, n, d, dtype):
    k = 257 if n < 257 else 65
    _proto_case(n, d, k, dtype, "triton", n % 2 == 0, n != 7, *_TRITON_TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("n, d, dtype", _TRITON_CASES)
def test_sinkhorn_triton(triton_cpu, n, d, dtype):
    k = 4 * d + 1
    scores = (torch.randn(n, k) * 0.5).to(dtype)
    with force_backend("sinkhorn_knopp", "triton"):
        got = sinkhorn_knopp(scores, 3, 0.05)
    assert last_backend("sinkhorn_knopp") == "triton"
    assert got.dtype == dtype
    want = sinkhorn_knopp_reference(scores.double(), 3, 0.05)
    atol, rtol = (1e-6, 1e-4) if dtype == torch.float32 else (1e-3, 1e-2)
    assert_close(got, want, atol, rtol, "sinkhorn triton")


@pytest.mark.triton
def test_triton_losses_bf16(triton_cpu):
    _nce_case(49, 44, torch.bfloat16, "triton", 0.1, 2e-2, 5e-2)
    _proto_case(49, 44, 100, torch.bfloat16, "triton", True, True, 2e-2, 5e-2)

"""Reduced precision done right in the loss kernels: under autocast (bf16 / fp16) and with
half-precision inputs, the chunked and the Triton engines accumulate in float32, so the loss,
its input gradients and the heads' gradients stay within 1e-2 (relative to the largest
element) of a float64 reference computed from the same half-precision inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense.kernels import force_backend, last_backend
from skysense.kernels.info_nce import info_nce, info_nce_reference
from skysense.kernels.prototype_loss import (
    prototype_cross_entropy,
    prototype_cross_entropy_reference,
)

REL = 1e-2


def _rel_close(got, want, what):
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= REL * scale, f"{what}: max error {err:.3e} > {REL} x max |ref| {scale:.3e}"


def _backends():
    return [
        pytest.param("chunked", marks=pytest.mark.unit, id="chunked"),
        pytest.param("triton", marks=pytest.mark.triton, id="triton"),
    ]


@pytest.fixture
def backend(request):
    name = request.param
    if name == "triton":
        request.getfixturevalue("triton_cpu")
    return name


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_info_nce_under_autocast_with_a_head(backend, dtype):
    """Embeddings from a linear head under autocast (half-precision outputs, as in training):
    loss, embedding gradients and head gradient against float64 from the same embeddings."""
    n, d_in, d = 96, 48, 40
    head = torch.nn.Linear(d_in, d, bias=False)
    xa, xb = torch.randn(n, d_in), torch.randn(n, d_in)
    with torch.autocast("cpu", dtype=dtype), force_backend("info_nce", backend):
        a = F.normalize(head(xa), dim=1)
        b = F.normalize(head(xb), dim=1)
        a.retain_grad()
        b.retain_grad()
        loss = info_nce(a, b, 0.07)
    assert last_backend("info_nce") == backend
    assert a.dtype == dtype  # the loss really received half-precision embeddings
    loss.backward()
    ra, rb = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = info_nce_reference(ra, rb, 0.07)
    ref.backward()
    _rel_close(loss, ref, "loss")
    _rel_close(a.grad, ra.grad, "d a")
    _rel_close(b.grad, rb.grad, "d b")
    # The head's gradient: through the normalisation and the linear layer from the reference's
    # embedding gradients (float64 all the way).
    with torch.enable_grad():
        w = head.weight.detach().double().requires_grad_()
        ea = F.normalize(xa.double() @ w.t(), dim=1)
        eb = F.normalize(xb.double() @ w.t(), dim=1)
        torch.autograd.backward([ea, eb], [ra.grad, rb.grad])
    _rel_close(head.weight.grad, w.grad, "head weight")


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prototype_ce_half_inputs_and_autocast(backend, dtype):
    """Half-precision features and prototype head (the student's W, which gets a gradient)
    under autocast: loss and both gradients against float64 from the same values."""
    n, d, k = 80, 48, 300
    sx = torch.randn(n, d).to(dtype).requires_grad_()
    tx = torch.randn(n, d).to(dtype)
    w = (torch.randn(k, d) * 0.3).to(dtype).requires_grad_()
    center = torch.randn(k) * 0.1
    with torch.autocast("cpu", dtype=dtype), force_backend("prototype_cross_entropy", backend):
        loss = prototype_cross_entropy(sx, tx, w, None, center, 0.1, 0.04)
    assert last_backend("prototype_cross_entropy") == backend
    loss.backward()
    rs, rw = sx.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = prototype_cross_entropy_reference(rs, tx.double(), rw, None, center.double(), 0.1, 0.04)
    ref.backward()
    _rel_close(loss, ref, "loss")
    _rel_close(sx.grad, rs.grad, "d student_x")
    _rel_close(w.grad, rw.grad, "d weight (head)")


@pytest.mark.unit
def test_chunked_losses_ignore_autocast_for_float32_inputs():
    """float32 inputs under bf16 autocast: the chunked engine computes the logits in float32
    (autocast would round every logit to bf16), so the result equals the one without it."""
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    with force_backend("info_nce", "chunked"):
        plain = info_nce(a, b, 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = info_nce(a, b, 0.05)
    assert auto.dtype == torch.float32
    assert torch.allclose(plain, auto, rtol=1e-6, atol=1e-6), (plain.item(), auto.item())
    sx, w = torch.randn(32, 16), torch.randn(100, 16)
    with force_backend("prototype_cross_entropy", "chunked"):
        plain = prototype_cross_entropy(sx, sx, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = prototype_cross_entropy(sx, sx, w)
    assert torch.allclose(plain, auto, rtol=1e-6, atol=1e-6), (plain.item(), auto.item())

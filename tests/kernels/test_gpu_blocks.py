"""The Triton kernels under the interpreter at the block sizes the launchers pick on a GPU
(``launch_configs.gpu_blocks``), not the interpreter's own 256-wide blocks: small odd shapes
that end inside a tile, so the masking at real tile edges (rows, keys, head dim, features,
prototypes) is exercised against the float64 references."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_attention import _check, _inputs

from skysense.kernels import force_backend, last_backend
from skysense.kernels import launch_configs as lc
from skysense.kernels.info_nce import info_nce, info_nce_reference
from skysense.kernels.prototype_loss import (
    prototype_cross_entropy,
    prototype_cross_entropy_reference,
)
from skysense.kernels.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

pytestmark = pytest.mark.triton


@pytest.fixture
def gpu_blocks(triton_cpu):
    with lc.gpu_blocks():
        yield


# Lengths that end inside a tile of the GPU tables (tiles of 16, 32 or 64), head dims that pad
# (44 -> 64, 20 -> 32) and one that fills its tile.
_ATTN = [
    pytest.param(70, 44, torch.float16, "swin", True, id="N70-D44-fp16-swin-pad"),
    pytest.param(70, 44, torch.float32, "swin", True, id="N70-D44-fp32-swin-pad"),
    pytest.param(37, 20, torch.float32, "rows_cols", False, id="N37-D20-fp32-rows_cols"),
    pytest.param(7, 32, torch.float16, None, True, id="N7-D32-fp16-pad"),
]


@pytest.mark.parametrize("N, D, dtype, bias_kind, pad", _ATTN)
def test_attention_at_gpu_blocks(gpu_blocks, N, D, dtype, bias_kind, pad):
    want = lc.attention_launch("attn_fwd", D, str(dtype)[6:], N, N)
    assert want.get("BLOCK_M") < lc.INTERPRETER_BLOCK  # really not the interpreter's blocks
    q, k, v, biases, mask = _inputs(2, 2, N, N, D, dtype, bias_kind, pad)
    _check(q, k, v, biases, mask, "triton")


def test_attention_cross_lengths_at_gpu_blocks(gpu_blocks):
    """Queries and keys end in different tiles (Nq = 33, Nk = 81)."""
    q = torch.randn(2, 2, 33, 44).requires_grad_()
    k = torch.randn(2, 2, 81, 44).requires_grad_()
    v = torch.randn(2, 2, 81, 44).requires_grad_()
    mask = torch.rand(2, 81) < 0.2
    _check(q, k, v, [torch.randn(1, 2, 33, 81).requires_grad_()], mask, "triton")


_LOSS = [
    pytest.param(70, 44, torch.float32, id="N70-d44-fp32"),
    pytest.param(70, 44, torch.float16, id="N70-d44-fp16"),
    pytest.param(33, 150, torch.float32, id="N33-d150-fp32"),
]
_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 2e-2)}


@pytest.mark.parametrize("n, d, dtype", _LOSS)
def test_info_nce_at_gpu_blocks(gpu_blocks, n, d, dtype):
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    with force_backend("info_nce", "triton"):
        loss = info_nce(a, b, 0.1)
    assert last_backend("info_nce") == "triton"
    loss.backward()
    ra, rb = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = info_nce_reference(ra, rb, 0.1)
    ref.backward()
    atol, rtol = _TOL[dtype]
    assert_close(loss, ref, atol, rtol, "loss")
    assert_close(a.grad, ra.grad, atol, rtol, "da")
    assert_close(b.grad, rb.grad, atol, rtol, "db")


@pytest.mark.parametrize("n, d, dtype", _LOSS)
def test_prototype_at_gpu_blocks(gpu_blocks, n, d, dtype):
    k = 130  # two full prototype tiles of 64 and a tail of 2
    sx = torch.randn(n, d).to(dtype).requires_grad_()
    tx = torch.randn(n, d).to(dtype)
    w = (torch.randn(k, d) * 0.2).to(dtype).requires_grad_()
    center = torch.randn(k) * 0.1
    with force_backend("prototype_cross_entropy", "triton"):
        loss = prototype_cross_entropy(sx, tx, w, None, center, 0.1, 0.04)
    assert last_backend("prototype_cross_entropy") == "triton"
    loss.backward()
    rs, rw = sx.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = prototype_cross_entropy_reference(rs, tx.double(), rw, None, center.double(), 0.1, 0.04)
    ref.backward()
    atol, rtol = _TOL[dtype]
    assert_close(loss, ref, atol, rtol, "loss")
    assert_close(sx.grad, rs.grad, atol, rtol, "dsx")
    assert_close(w.grad, rw.grad, atol, rtol, "dw")


def test_sinkhorn_at_gpu_blocks(gpu_blocks):
    scores = torch.randn(70, 130) * 0.5  # 64-row and 128-column tiles with tails
    with force_backend("sinkhorn_knopp", "triton"):
        got = sinkhorn_knopp(scores, 3, 0.05)
    assert last_backend("sinkhorn_knopp") == "triton"
    assert_close(got, sinkhorn_knopp_reference(scores.double(), 3, 0.05), 1e-6, 1e-4, "sinkhorn")

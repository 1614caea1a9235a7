"""attention: the fused Triton kernel (interpreter) and the sdpa path against the float64
reference, forward and backward, biases read through strides, padding masks."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from skysense.kernels import attention, force_backend, last_backend
from skysense.kernels.attention import attention_reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def _inputs(B, H, Nq, Nk, D, dtype, bias_kind, pad, grad_bias=True):
    q = torch.randn(B, H, Nq, D).to(dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D).to(dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D).to(dtype).requires_grad_()
    biases = []
    if bias_kind == "swin":  # relative position bias (1, H, N, N) + shift mask (nW, 1, N, N)
        nw = 2
        assert B % nw == 0
        rel = torch.randn(1, H, Nq, Nk).requires_grad_(grad_bias)
        shift = torch.where(torch.rand(nw, 1, Nq, Nk) < 0.3, -100.0, 0.0)
        biases = [rel, shift]
    elif bias_kind == "full":
        biases = [torch.randn(B, H, Nq, Nk).requires_grad_(grad_bias)]
    elif bias_kind == "rows_cols":  # broadcast over queries, and over keys: reduced gradients
        biases = [
            torch.randn(B, 1, 1, Nk).requires_grad_(grad_bias),
            torch.randn(H, Nq, 1).requires_grad_(grad_bias),
        ]
    mask = None
    if pad:
        mask = torch.rand(B, Nk) < 0.3
        mask[0, : Nk // 2 + 1] = True  # a long padded stretch
    return q, k, v, biases, mask


def _check(q, k, v, biases, mask, backend, scale=None, tol=None):
    dtype = q.dtype
    with force_backend("attention", backend):
        out = attention(q, k, v, biases or None, mask, scale=scale)
    assert last_backend("attention") == backend
    g = torch.randn_like(out)
    out.backward(g)
    leaves = [q, k, v] + [b for b in biases if b.requires_grad]
    got = [out] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    it = iter(ref_leaves[3:])
    rb = [next(it) if b.requires_grad else b.double() for b in biases]
    ref = attention_reference(rq, rk, rv, rb or None, mask, scale=scale)
    ref.backward(g.double())
    want = [ref] + [t.grad for t in ref_leaves]
    atol, rtol = tol or TOL[dtype]
    names = ["out", "dq", "dk", "dv"] + [f"dbias{i}" for i in range(len(leaves) - 3)]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, atol, rtol, f"{backend} {dtype} {name}")
    return out


# The odd sizes; each (N, D, dtype) gets one of the bias/padding variants, and N = 49
# gets all of them, so every variant meets every dtype and several lengths. Two windows of one
# head keep the interpreter quick.
_VARIANTS = [(None, False), ("swin", False), (None, True), ("swin", True)]
_CASES = []
for _i, (_n, _d, _dt) in enumerate(
    (n, d, dt)
    for n in (1, 7, 49, 64, 257)
    for d in (32, 44, 64)
    for dt in (torch.float32, torch.float16)
):
    variants = _VARIANTS if _n == 49 else [_VARIANTS[_i % 4]]
    for _bias, _pad in variants:
        _CASES.append(
            pytest.param(
                _n, _d, _dt, _bias, _pad, id=f"N{_n}-D{_d}-{str(_dt)[6:]}-{_bias}-pad{int(_pad)}"
            )
        )


@pytest.mark.triton
@pytest.mark.parametrize("N, D, dtype, bias_kind, pad", _CASES)
def test_triton_attention_matches_reference(triton_cpu, N, D, dtype, bias_kind, pad):
    q, k, v, biases, mask = _inputs(2, 1, N, N, D, dtype, bias_kind, pad)
    _check(q, k, v, biases, mask, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("bias_kind", ["full", "rows_cols"])
def test_triton_bias_gradients_reduced_to_their_shapes(triton_cpu, bias_kind):
    q, k, v, biases, mask = _inputs(2, 3, 33, 33, 44, torch.float32, bias_kind, True)
    _check(q, k, v, biases, mask, "triton")
    for b in biases:
        assert b.grad.shape == b.shape


@pytest.mark.triton
def test_triton_expanded_bias_is_read_through_stride_zero(triton_cpu):
    table = torch.randn(1, 2, 49, 49, requires_grad=True)
    q, k, v, _, mask = _inputs(4, 2, 49, 49, 32, torch.float32, None, True)
    expanded = table.expand(4, 2, 49, 49)  # stride 0 over the batch: never copied by the kernel
    with force_backend("attention", "triton"):
        out = attention(q, k, v, expanded, mask)
    g = torch.randn_like(out)
    out.backward(g)
    ref_table = table.detach().double().requires_grad_()
    ref = attention_reference(q.double(), k.double(), v.double(), ref_table, mask)
    ref.backward(g.double())
    assert_close(out, ref, 1e-4, 1e-4, "out")
    assert_close(table.grad, ref_table.grad, 1e-4, 1e-4, "d table")


@pytest.mark.triton
def test_triton_cross_attention_noncontiguous_custom_scale(triton_cpu):
    B, H, Nq, Nk, D = 2, 3, 20, 37, 44
    # (B, N, H, D) storage permuted to (B, H, N, D): strides the kernel must follow
    q = torch.randn(B, Nq, H, D).permute(0, 2, 1, 3).detach().requires_grad_()
    k = torch.randn(B, Nk, H, D).permute(0, 2, 1, 3).detach().requires_grad_()
    v = torch.randn(B, Nk, H, D).permute(0, 2, 1, 3).detach().requires_grad_()
    bias = torch.randn(1, H, Nq, Nk, requires_grad=True)
    mask = torch.rand(B, Nk) < 0.2
    _check(q, k, v, [bias], mask, "triton", scale=0.37)


@pytest.mark.triton
def test_triton_bf16(triton_cpu):
    q, k, v, biases, mask = _inputs(2, 2, 49, 49, 44, torch.bfloat16, "swin", True)
    _check(q, k, v, biases, mask, "triton")


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sdpa", marks=pytest.mark.unit),
        pytest.param("matmul", marks=pytest.mark.unit),
        pytest.param("reference", marks=pytest.mark.unit),
        pytest.param("triton", marks=pytest.mark.triton),
    ],
)
def test_all_masked_rows_give_zeros_and_finite_grads(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    q, k, v, biases, mask = _inputs(2, 2, 7, 7, 32, torch.float32, "swin", False)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1] = True  # batch 1: every key missing
    out = _check(q, k, v, biases, mask, backend)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(q.grad[1]) == 0


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
@pytest.mark.parametrize("bias_kind", [None, "swin", "full", "rows_cols"])
def test_sdpa_and_matmul_match_reference(backend, bias_kind):
    q, k, v, biases, mask = _inputs(4, 2, 23, 23, 44, torch.float32, bias_kind, True)
    _check(q, k, v, biases, mask, backend)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_low_precision_matches_reference(dtype):
    q, k, v, biases, mask = _inputs(4, 2, 49, 49, 32, dtype, "swin", True)
    _check(q, k, v, biases, mask, "matmul", tol=(3e-2, 3e-2) if dtype == torch.float16 else None)


@pytest.mark.unit
def test_matmul_periodic_biases_of_two_periods():
    # Leading dims 2 and 4 of B = 8: added one after the other, each periodically.
    q, k, v = (torch.randn(8, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    biases = [torch.randn(2, 1, 9, 9, dtype=torch.float64), torch.randn(4, 2, 9, 9).double()]
    with force_backend("attention", "matmul"):
        got = attention(q, k, v, biases)
    torch.testing.assert_close(got, attention_reference(q, k, v, biases))


@pytest.mark.unit
def test_cpu_dispatch_picks_sdpa_and_reports_it():
    q = torch.randn(2, 2, 5, 8)
    attention(q, q, q)
    assert last_backend("attention") == "sdpa"


@pytest.mark.unit
def test_cpu_dispatch_picks_matmul_where_a_bias_requires_grad():
    q = torch.randn(4, 2, 5, 8)
    rel = torch.randn(1, 2, 5, 5, requires_grad=True)
    attention(q, q, q, [rel, torch.zeros(2, 1, 5, 5)])
    assert last_backend("attention") == "matmul"
    with torch.no_grad():
        attention(q, q, q, rel)
    assert last_backend("attention") == "sdpa"
    attention(q, q, q, rel.detach())
    assert last_backend("attention") == "sdpa"


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_cpu_backends_trace_as_one_graph(backend):
    # No graph break under torch.compile: neither the dispatch's logging nor the handling of
    # rows whose keys are all padding (no data-dependent branch).
    import torch._dynamo

    q = torch.randn(4, 2, 7, 8)
    rel = torch.randn(1, 2, 7, 7, requires_grad=True)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[1] = True
    mask[2, :3] = True

    def f(q, rel, mask):
        with force_backend("attention", backend):
            return attention(q, q, q, [rel, torch.zeros(2, 1, 7, 7)], mask)

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(q, rel, mask)
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1
    torch._dynamo.reset()
    got = torch.compile(f, backend="eager", fullgraph=True)(q, rel, mask)
    torch.testing.assert_close(
        got, attention_reference(q, q, q, [rel, torch.zeros(2, 1, 7, 7)], mask)
    )
    assert torch.count_nonzero(got[1]) == 0


@pytest.mark.unit
def test_periodic_bias_batch_b_reads_b_mod_nw():
    # Four windows of two images (image-major): batch b must read shift[b % 2].
    q, k, v = (torch.randn(4, 1, 5, 8, dtype=torch.float64) for _ in range(3))
    shift = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    out = attention_reference(q, k, v, [shift])
    for b in range(4):
        alone = attention_reference(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], shift[b % 2 : b % 2 + 1]
        )
        assert torch.allclose(out[b : b + 1], alone)


@pytest.mark.unit
def test_bad_inputs_raise_clear_errors():
    q = torch.randn(4, 2, 5, 8)
    with pytest.raises(ValueError, match=r"bias\[1\].*dim 0 has 3"):
        attention(q, q, q, [torch.zeros(1, 2, 5, 5), torch.zeros(3, 1, 5, 5)])
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention(q, q, q, key_padding_mask=torch.zeros(4, 5))
    with (
        pytest.raises(ValueError, match="unknown backend"),
        force_backend("attention", "cuda-magic"),
    ):
        attention(q, q, q)
    with pytest.raises(RuntimeError, match="xformers"), force_backend("attention", "xformers"):
        attention(q, q, q)


@pytest.mark.triton
def test_forced_triton_refuses_what_it_cannot_take(triton_cpu):
    q = torch.randn(1, 1, 4, 300)
    with (
        force_backend("attention", "triton"),
        pytest.raises(RuntimeError, match="head dims up to 256"),
    ):
        attention(q, q, q)
    q = torch.randn(1, 1, 4, 8)
    with force_backend("attention", "triton"), pytest.raises(RuntimeError, match="dropout"):
        attention(q, q, q, dropout_p=0.1)

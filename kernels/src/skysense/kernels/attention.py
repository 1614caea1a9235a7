"""Scaled dot-product attention with additive biases and a key padding mask: one public op.

Backends, picked per call (first that takes the inputs):
- ``triton``: the fused Triton kernel, forward and backward (``triton_attention``), on CUDA for
  fp32/fp16/bf16, head dim <= ``MAX_HEAD_DIM`` (256), at most two bias tensors, no dropout. Forced, it also runs on
  CPU tensors under the Triton interpreter (the test tier).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` on CUDA, where one of its operators
  actually runs on these inputs (probed once per kind of input and cached: an xformers whose C++
  extension does not load may still serve through its PyTorch-backed operators).
- ``matmul``: explicit q k^T + biases, softmax, times v (any device), picked on the CPU when
  a bias requires grad (Swin V2's learned position bias), where it beats sdpa forward +
  backward; the biases are added by broadcasting, never repeated B times.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (any device; the merged bias
  is materialised there).
- ``reference``: plain PyTorch math (tests).

Biases: ``bias`` is a tensor or a sequence of tensors, each broadcastable to (B, H, Nq, Nk) by
the one rule of ``attention_bias`` (a leading dim that divides B is applied periodically).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from skysense.kernels import dispatch
from skysense.kernels.attention_bias import MAX_BIASES, MAX_HEAD_DIM, bias_spec

log = logging.getLogger(__name__)

OP = "attention"
BACKENDS = ("triton", "xformers", "sdpa", "matmul", "reference")


def _bias_list(bias) -> list[torch.Tensor]:
    if bias is None:
        return []
    if isinstance(bias, torch.Tensor):
        return [bias]
    if isinstance(bias, Sequence):
        out = [b for b in bias if b is not None]
        for i, b in enumerate(out):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"attention: bias[{i}] must be a tensor, got {type(b).__name__}")
        return out
    raise TypeError(f"attention: bias must be a tensor or a sequence of tensors, got {type(bias)}")


def _check(q, k, v, biases, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)} (need q (B, H, Nq, D), k and v (B, H, Nk, D))"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
            f"{k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2])
    ):
        raise ValueError(
            f"attention: key_padding_mask must be bool (B, Nk) = ({k.shape[0]}, {k.shape[2]}); "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    for i, b in enumerate(biases):
        if b.device != q.device:
            raise ValueError(f"attention: bias[{i}] is on {b.device}, q on {q.device}")
        bias_spec(b, i, B, H, Nq, Nk)


def _merged_bias(q, k, biases, dtype):
    """The sum of the biases as one tensor broadcastable to (B, H, Nq, Nk), materialised only
    as far as the biases need (a single broadcastable bias is returned as a view)."""
    if not biases:
        return None
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    views = []
    for i, b in enumerate(biases):
        views.append(bias_spec(b, i, B, H, Nq, Nk).view)
    if len(views) == 1 and views[0].shape[0] in (1, B):
        return views[0].to(dtype)
    shape = [max(v.shape[d] for v in views) for d in range(4)]
    if shape[0] != 1:
        shape[0] = B
    out = torch.zeros(shape, dtype=dtype, device=q.device)
    for v in views:
        bb = v.shape[0]
        if bb in (1, shape[0]):
            out += v
        else:  # batch b reads bias[b % bb]: image-major blocks of bb
            out.view(B // bb, bb, *shape[1:]).add_(v.unsqueeze(0))
    return out


def attention_reference(q, k, v, bias=None, key_padding_mask=None, scale=None):
    """Plain PyTorch attention: softmax(q k^T * scale + bias, masked keys excluded) v.

    q: (B, H, Nq, D), k/v: (B, H, Nk, D); bias: a tensor or a sequence of tensors, each
    broadcastable to (B, H, Nq, Nk) (leading dim periodic over B); key_padding_mask: (B, Nk)
    bool, True = key is padding. A query row whose keys are all masked gives zeros (and zero
    gradients). Computed in the inputs' dtype; materialises the (B, H, Nq, Nk) scores.
    """
    biases = _bias_list(bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    mb = _merged_bias(q, k, biases, s.dtype)
    if mb is not None:
        s = s + mb
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    # A safe softmax: a row of -inf gives zeros, and no NaN reaches the backward.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.matmul(p, v)


def _padding(q, key_padding_mask):
    """The key padding mask as a (B, 1, 1, Nk) additive bias (0 on keys, -inf on padding), and
    the (B,) bool rows whose keys are all padding.

    A row whose keys are all masked would be softmax(-inf...) = NaN, in the forward and the
    backward: such rows are left unmasked here and the caller zeroes their output with
    :func:`_zero_rows`. Branch-free (no data-dependent Python ``if``), so that torch.compile and
    torch.export trace it as one graph.
    """
    all_masked = key_padding_mask.all(dim=1)
    kpm = key_padding_mask & ~all_masked[:, None]
    pad = torch.zeros(kpm.shape, dtype=q.dtype, device=q.device)
    return pad.masked_fill(kpm, float("-inf"))[:, None, None, :], all_masked


def _zero_rows(out, all_masked):
    """``out`` (B, H, Nq, D) with the batches in ``all_masked`` (B,) zeroed (and their
    gradients with them); unconditional, as a data-dependent check would break the graph."""
    if all_masked is None:
        return out
    return out.masked_fill(all_masked[:, None, None, None], 0.0)


def _additive_mask(q, k, biases, key_padding_mask):
    """The biases and the padding as one additive mask broadcastable to (B, H, Nq, Nk) (None
    when there is neither), and the (B,) bool rows whose keys are all padding (or None)."""
    mask = _merged_bias(q, k, biases, q.dtype)
    all_masked = None
    if key_padding_mask is not None:
        pad, all_masked = _padding(q, key_padding_mask)
        mask = pad if mask is None else mask + pad
    return mask, all_masked


def _sdpa(q, k, v, biases, key_padding_mask, scale, dropout_p):
    mask, all_masked = _additive_mask(q, k, biases, key_padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return _zero_rows(out, all_masked)


def _add_biases(s, biases):
    """``s`` (B, H, Nq, Nk) plus every bias, periodic leading dims included, without repeating
    a bias B times: biases whose leading dims are 1 or one common period P are first summed
    among themselves (a (P, H, Nq, Nk) tensor at most), then added to ``s`` in one pass."""
    B = s.shape[0]
    views = [b[(None,) * (4 - b.dim())].to(s.dtype) for b in biases]
    periods = {b.shape[0] for b in views} - {1}
    if len(periods) <= 1:
        merged = views[0]
        for b in views[1:]:
            merged = merged + b
        views = [merged]
    for b in views:
        bb = b.shape[0]
        if bb in (1, B):
            s = s + b
        else:  # batch b reads bias[b % bb]: image-major blocks of bb
            s = (s.view(B // bb, bb, *s.shape[1:]) + b).view(s.shape)
    return s


def _matmul(q, k, v, biases, key_padding_mask, scale, dropout_p):
    """Explicit attention: q k^T * scale + biases, softmax, times v; autograd through the aten
    ops. On the CPU, where a bias requires grad (Swin V2's continuous relative position bias
    is learned), sdpa runs its unfused math path on the bias repeated to (B, H, Nq, Nk); this
    one adds the biases by broadcasting and is faster forward + backward (see ``_choose``)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if scale != 1.0:
        q = q * scale
    s = torch.matmul(q, k.transpose(-1, -2))
    if biases:
        s = _add_biases(s, biases)
    all_masked = None
    if key_padding_mask is not None:
        pad, all_masked = _padding(q, key_padding_mask)
        s = s + pad
    if s.dtype in (torch.float16, torch.bfloat16):
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype)
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return _zero_rows(torch.matmul(p, v), all_masked)


# --- xformers -----------------------------------------------------------------------------------

_xformers_probe: dict[tuple, str | None] = {}


def _xformers_call(q, k, v, biases, key_padding_mask, scale, dropout_p):
    import xformers.ops as xops

    mask, all_masked = _additive_mask(q, k, biases, key_padding_mask)
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_bias=mask, p=dropout_p, scale=scale,
    ).transpose(1, 2)  # fmt: skip
    return _zero_rows(out, all_masked)


def xformers_unavailable_reason(q, has_bias: bool) -> str | None:
    """Why xformers cannot serve inputs like ``q`` (None when it can). Probed once per
    (device, dtype, head dim, bias or not) with a tiny forward and backward, then cached."""
    key = (q.device.type, q.dtype, q.shape[-1], has_bias)
    if key in _xformers_probe:
        return _xformers_probe[key]
    reason = None
    if q.device.type != "cuda":
        reason = f"xformers' memory_efficient_attention needs CUDA tensors (got {q.device.type})"
    else:
        try:
            import xformers.ops  # noqa: F401

            t = torch.randn(1, 2, 16, q.shape[-1], device=q.device, dtype=q.dtype)
            t.requires_grad_(True)
            bias = [torch.zeros(1, 2, 16, 16, device=q.device, dtype=q.dtype)] if has_bias else []
            _xformers_call(t, t, t, bias, None, None, 0.0).sum().backward()
        except Exception as e:  # any failure (import, no operator, kernel error) rules it out
            reason = f"xformers cannot run these inputs: {type(e).__name__}: {str(e)[:200]}"
    if reason:
        log.info("attention: xformers unavailable for %s: %s", key, reason)
    _xformers_probe[key] = reason
    return reason


# --- dispatch -----------------------------------------------------------------------------------


def _triton_unavailable_reason(q, biases, dropout_p) -> str | None:
    r = dispatch.triton_reason(q)
    if r:
        return r
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if len(biases) > MAX_BIASES:
        return f"the Triton kernel takes at most {MAX_BIASES} bias tensors, got {len(biases)}"
    if dropout_p > 0.0:
        return "the Triton kernel has no attention dropout (dropout_p > 0)"
    return None


def _choose(q, biases, key_padding_mask, dropout_p) -> str:
    has_bias = bool(biases) or key_padding_mask is not None
    reasons = {
        "triton": lambda: _triton_unavailable_reason(q, biases, dropout_p),
        "xformers": lambda: xformers_unavailable_reason(q, has_bias),
    }
    fallback = "sdpa"
    if not q.is_cuda and torch.is_grad_enabled() and any(b.requires_grad for b in biases):
        # CPU sdpa with an attn_mask that requires grad (Swin V2's learned position bias) runs
        # unfused on the bias repeated B times; the explicit path was 1.3-1.9x faster forward +
        # backward on Swin windows (256 windows of 64 tokens, 3 or 6 heads of 32, with and
        # without a shift mask).
        fallback = "matmul"
    auto = ("triton", "xformers") if q.is_cuda else ()
    return dispatch.choose(OP, BACKENDS, reasons, auto, fallback)


def attention(q, k, v, bias=None, key_padding_mask=None, scale=None, dropout_p=0.0):
    """Attention over (B, H, N, D) tensors.

    Args:
        q: (B, H, Nq, D) float32/float16/bfloat16.
        k, v: (B, H, Nk, D), same dtype and device as q.
        bias: None, a float tensor or a sequence of float tensors, each broadcastable to
            (B, H, Nq, Nk), where a leading dim Bb dividing B is applied periodically (batch b
            reads bias[b % Bb]). The Triton kernel reads them through their strides (a stride-0
            dim is a broadcast one) and sums them on the fly; each may require grad (Swin's
            relative position bias table), its gradient reduced to its own shape.
        key_padding_mask: (B, Nk) bool, True where the key is padding (a missing time step).
            A query whose keys are all masked returns zeros.
        scale: multiplier of q k^T; default 1/sqrt(D).
        dropout_p: attention dropout probability (sdpa, matmul and xformers backends only).

    Returns:
        (B, H, Nq, D) in q's dtype. ``last_backend("attention")`` names the backend that ran.
    """
    biases = _bias_list(bias)
    _check(q, k, v, biases, key_padding_mask)
    backend = _choose(q, biases, key_padding_mask, dropout_p)
    if backend == "triton":
        from skysense.kernels.triton_attention import flash_attention

        out = flash_attention(q, k, v, biases, key_padding_mask, scale)
    elif backend == "xformers":
        out = _xformers_call(q, k, v, biases, key_padding_mask, scale, dropout_p)
    elif backend == "sdpa":
        out = _sdpa(q, k, v, biases, key_padding_mask, scale, dropout_p)
    elif backend == "matmul":
        out = _matmul(q, k, v, biases, key_padding_mask, scale, dropout_p)
    else:
        if dropout_p > 0.0:
            raise ValueError("attention: the reference backend has no dropout")
        out = attention_reference(q, k, v, biases, key_padding_mask, scale)
    dispatch.record(OP, backend)
    return out

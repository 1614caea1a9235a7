"""Scaled dot-product attention with an additive bias and a key padding mask.

Backends: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``, any device) and
``reference`` (plain PyTorch math). The fused Triton kernel (CUDA) lands with the kernels issue.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from skysense.kernels import dispatch

OP = "attention"


def _check(q, k, v, bias, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (
        k.shape != v.shape[:3] + (k.shape[3],)
        or q.shape[:2] != k.shape[:2]
        or q.shape[3] != k.shape[3]
    ):
        raise ValueError(
            f"attention: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2])
    ):
        raise ValueError(
            f"attention: key_padding_mask must be bool (B, N) = ({k.shape[0]}, {k.shape[2]}); "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def _merged_mask(q, k, bias, key_padding_mask):
    """Additive float mask = bias + (-inf on padded keys), broadcastable to (B, H, Nq, Nk)."""
    m = bias
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        m = pad if m is None else m.to(q.dtype) + pad
    elif m is not None:
        m = m.to(q.dtype)
    return m


def attention_reference(q, k, v, bias=None, key_padding_mask=None, scale=None):
    """Plain PyTorch attention: softmax(q k^T * scale + bias, masked keys excluded) v.

    q: (B, H, Nq, D), k/v: (B, H, Nk, D); bias broadcastable to (B, H, Nq, Nk);
    key_padding_mask: (B, Nk) bool, True = key is padding. A query row whose keys are all masked
    gives zeros. Computed in the inputs' dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.matmul(p, v)


def _sdpa(q, k, v, bias, key_padding_mask, scale, dropout_p):
    mask = _merged_mask(q, k, bias, key_padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if key_padding_mask is not None:
        # Rows with every key masked come out NaN from softmax(-inf...); the contract is zeros.
        all_masked = key_padding_mask.all(dim=1)
        if bool(all_masked.any()):
            out = out.masked_fill(all_masked[:, None, None, None], 0.0)
    return out


def attention(q, k, v, bias=None, key_padding_mask=None, scale=None, dropout_p=0.0):
    """Attention over (B, H, N, D) tensors.

    Args:
        q: (B, H, Nq, D) float32/float16/bfloat16.
        k, v: (B, H, Nk, D), same dtype and device as q.
        bias: additive float bias broadcastable to (B, H, Nq, Nk), read through its strides
            (e.g. Swin's relative position bias (1, H, N, N) plus a shift mask); may require grad.
        key_padding_mask: (B, Nk) bool, True where the key is padding (a missing time step).
            A query whose keys are all masked returns zeros.
        scale: multiplier of q k^T; default 1/sqrt(D).
        dropout_p: attention dropout (training only; sdpa backend).

    Returns:
        (B, H, Nq, D) in q's dtype. :func:`skysense.kernels.last_backend` ("attention") names the
        backend that ran.
    """
    _check(q, k, v, bias, key_padding_mask)
    forced = dispatch.forced_backend(OP)
    backend = forced or "sdpa"
    if backend == "reference":
        out = attention_reference(q, k, v, bias, key_padding_mask, scale)
    elif backend == "sdpa":
        out = _sdpa(q, k, v, bias, key_padding_mask, scale, dropout_p)
    else:
        raise NotImplementedError(f"attention backend '{backend}' is not available yet")
    dispatch.record(OP, backend)
    return out

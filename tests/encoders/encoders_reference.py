"""Straightforward reference implementations the encoder tests compare against.

Written independently of the modules under test: dense attention over every token pair with
explicit masks, loops where the module vectorises, the formulas of the paper as written.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F


def cpb_coord(d: int, window: int) -> float:
    """Swin V2's log-spaced coordinate of offset d in a window of ``window`` tokens."""
    t = d / max(window - 1, 1) * 8.0
    return math.copysign(math.log2(abs(t) + 1.0) / 3.0, t) if t else 0.0


def shifted_groups(n: int, win: int, shift: int) -> list[int]:
    """Group of each of n positions in a partition into windows of ``win`` that starts
    ``shift`` positions late (the first ``shift`` positions form their own group)."""
    padded = -(-n // win) * win
    bounds = sorted({0, *range(shift, padded, win)})
    return [bisect.bisect_right(bounds, i) for i in range(n)]


def window_attention_reference(attn, x: torch.Tensor) -> torch.Tensor:
    """Swin V2 window attention of module ``attn`` on x (B, H, W, C), as dense attention over
    all H W tokens where a pair may interact only inside one (shifted) window.

    Windows along a dimension no longer than the configured window shrink to the map and
    are not shifted; otherwise the shift is half a window."""
    B, H, W, C = x.shape
    wh, ww = attn.window_size
    heads = attn.num_heads
    eh, ew = min(wh, H), min(ww, W)
    sh = wh // 2 if attn.shift and wh < H else 0
    sw = ww // 2 if attn.shift and ww < W else 0
    gy, gx = shifted_groups(H, eh, sh), shifted_groups(W, ew, sw)
    pos = [(y, xx) for y in range(H) for xx in range(W)]
    n = len(pos)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    coords = torch.zeros(n, n, 2, dtype=x.dtype)
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            allowed[i, j] = gy[yi] == gy[yj] and gx[xi] == gx[xj]
            coords[i, j, 0] = cpb_coord(yi - yj, wh)
            coords[i, j, 1] = cpb_coord(xi - xj, ww)
    bias = 16 * torch.sigmoid(attn.cpb_mlp(coords))  # (n, n, heads)
    t = x.reshape(B, n, C)
    w = attn.qkv.weight
    q = F.linear(t, w[:C], attn.q_bias)
    k = F.linear(t, w[C : 2 * C])
    v = F.linear(t, w[2 * C :], attn.v_bias)
    hd = C // heads
    out = torch.zeros_like(t)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        qh = F.normalize(q[..., sl], dim=-1)
        kh = F.normalize(k[..., sl], dim=-1)
        scale = torch.exp(torch.clamp(attn.logit_scale[h, 0, 0], max=math.log(100.0)))
        logits = qh @ kh.transpose(1, 2) * scale + bias[..., h]
        logits = logits.masked_fill(~allowed, float("-inf"))
        out[..., sl] = torch.softmax(logits, dim=-1) @ v[..., sl]
    return attn.proj(out).reshape(B, H, W, C)


def self_attention_reference(attn, x, key_padding_mask=None):
    """Multi-head self-attention of an ``Attention`` module, head by head with explicit masks."""
    B, N, C = x.shape
    heads = attn.num_heads
    hd = C // heads
    qkv = attn.qkv(x)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    out = torch.zeros_like(x)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        out[..., sl] = torch.softmax(logits, dim=-1) @ v[..., sl]
    return attn.proj(out)


def block_reference(block, x, key_padding_mask=None):
    """Pre-norm transformer block (eval mode: no drop path)."""
    x = x + self_attention_reference(block.attn, block.norm1(x), key_padding_mask)
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))

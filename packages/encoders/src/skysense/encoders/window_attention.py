"""Swin Transformer V2 window attention: cosine attention with a learned logit scale and a
continuous relative position bias, in plain or shifted windows.

Layout conventions: feature maps are channels-last ``(B, H, W, C)``; windows are cut
image-major, so window ``w`` of image ``b`` is row ``b * nW + w`` of the windowed batch.

Two window modes (:data:`WINDOW_MODES`) differ only on maps that the window does not tile:
- ``"masked"`` (default): a map not a multiple of the window is zero-padded and the padding
  masked out; a side no longer than the window is one (clipped) window along it, unshifted,
  while a longer side still shifts.
- ``"release"``: the behaviour of the released weights' code (OpenMMLab mmpretrain 1.2
  ``ShiftWindowMSA`` with ``pad_small_map=False``): the zero padding is attended to like any
  token; when the map's shorter side equals the window, neither side is shifted (and the full
  window is kept, the longer side padded); the shift mask adds -100 rather than excluding
  tokens. mmpretrain refuses a map whose shorter side is below the window (an assertion);
  here such a side is clipped to one window as in ``"masked"`` mode, and nothing is shifted.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from skysense.kernels import attention

# Added to the logits of token pairs that must not attend to each other (other shifted-window
# region, or padding). Finite so that a fused kernel's online softmax never meets -inf - -inf;
# cosine logits are bounded by 100 + 16, so exp(-1e4) is exactly 0 in every float dtype used.
MASKED = -1.0e4
# What the release's code adds to token pairs of different shifted-window regions (mmpretrain's
# ShiftWindowMSA): finite and not always negligible next to logits scaled by up to 100.
RELEASE_MASKED = -100.0
WINDOW_MODES = ("masked", "release")
# Upper bound of the learned logit scale (Swin V2: 1 / 0.01).
MAX_LOGIT_SCALE = math.log(100.0)
NORM_EPS = 1e-12  # as F.normalize


def _cached(maxsize: int):
    """Memoise a table builder in eager mode (the tables depend only on ints, device, dtype).

    Compiled and exported code traces the builder itself, so the tables become constants of
    the graph and no fake tensor ever lands in the cache; eager calls build them once, outside
    inference mode so that they can meet autograd later.
    """
    return functools.partial(_memoise, maxsize=maxsize)


def _memoise(fn, maxsize: int):
    cached = functools.lru_cache(maxsize=maxsize)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        with torch.inference_mode(False):
            return cached(*args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) with H % wh == W % ww == 0 -> (B * nW, wh * ww, C), image-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def effective_window(
    H: int, W: int, window: tuple[int, int], shift: bool, mode: str = "masked"
) -> tuple[int, int, int, int]:
    """Window (wh, ww) and shift (sh, sw) used on an H x W map in window ``mode``.

    ``"masked"``: a map no larger than the window along a dimension is one window along it,
    unshifted (a shift would only wrap the map onto itself). Larger maps keep the configured
    window and shift by half of it; sizes that are not a multiple of the window are padded
    (and the padding masked out).

    ``"release"``: as mmpretrain, a map whose side equals the window along either dimension
    is not shifted at all; the window keeps its size unless a side is below it (clipped to
    that side; the release's code refuses such maps).
    """
    wh, ww = window
    if mode == "release":
        small = wh >= H or ww >= W  # a side equals (or is below) the window
        sh = wh // 2 if shift and not small else 0
        sw = ww // 2 if shift and not small else 0
        return min(wh, H), min(ww, W), sh, sw
    if mode != "masked":
        raise ValueError(f"window mode must be one of {WINDOW_MODES}, got {mode!r}")
    sh = wh // 2 if shift and wh < H else 0
    sw = ww // 2 if shift and ww < W else 0
    return min(wh, H), min(ww, W), sh, sw


def log_spaced_coords(
    wh: int, ww: int, ref: tuple[int, int], device=None, dtype=torch.float32
) -> torch.Tensor:
    """Relative coordinates of a wh x ww window, log-spaced as in Swin V2.

    Offsets (dy, dx) in [-(wh-1), wh-1] x [-(ww-1), ww-1], row-major (dy slowest), are scaled
    to [-8, 8] by the configured window ``ref`` (so a window shrunk to a small map keeps the
    offsets' meaning), then mapped to sign(t) * log2(1 + |t|) / log2(8).

    Returns ((2 wh - 1) * (2 ww - 1), 2) in ``dtype``.
    """
    # float64 so that the table is exact before the cast, whatever the model's dtype
    dy = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float64)
    dx = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float64)
    t = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)
    norm = torch.tensor([max(ref[0] - 1, 1), max(ref[1] - 1, 1)], device=device)
    t = t / norm.to(t.dtype) * 8.0
    t = torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8.0)
    return t.to(dtype)


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """(N, N) int64, N = wh * ww: row of :func:`log_spaced_coords` for each token pair (i, j),
    the offset being position(i) - position(j)."""
    ys, xs = torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    return dy * (2 * ww - 1) + dx


@_cached(maxsize=64)
def window_tables(
    wh: int, ww: int, ref_h: int, ref_w: int, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`log_spaced_coords`, flattened :func:`relative_position_index`) of a window,
    built once per (window, configured window, device, dtype) in eager mode."""
    coords = log_spaced_coords(wh, ww, (ref_h, ref_w), device, dtype)
    return coords, relative_position_index(wh, ww, device).reshape(-1)


# A mask is nW x N x N floats (67 MB for a 2048 px tile's first stage): keep a few sizes.
@_cached(maxsize=16)
def window_mask(
    H: int,
    W: int,
    wh: int,
    ww: int,
    sh: int,
    sw: int,
    device=None,
    dtype=torch.float32,
    mode: str = "masked",
) -> torch.Tensor | None:
    """Additive mask (nW, N, N) for windows cut from the padded, rolled H x W map, or None.

    The map is padded at the bottom/right to (Hp, Wp), multiples of the window, then rolled by
    (-sh, -sw). Two tokens of one window may attend to each other only when they belong to the
    same window of the shifted partition in the original frame (the roll wraps the first sh
    rows next to the last ones; they are kept apart) and, in ``"masked"`` mode, neither is
    padding; pairs kept apart get :data:`MASKED`. In the original frame the shifted partition
    groups row y into (y + wh - sh) // wh, likewise columns.

    ``"release"`` mode: the padding is an ordinary token (the regions are those of the padded
    map), pairs kept apart get :data:`RELEASE_MASKED`, and an unshifted map has no mask.
    """
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    release = mode == "release"
    if sh == 0 and sw == 0 and (release or (Hp == H and Wp == W)):
        return None
    oy = (torch.arange(Hp, device=device) + sh) % Hp  # original row of each rolled row
    ox = (torch.arange(Wp, device=device) + sw) % Wp
    gy = (oy + wh - sh) // wh
    gx = (ox + ww - sw) // ww
    label = gy[:, None] * (Wp // ww + 2) + gx[None, :]
    if not release:
        label = label * 2 + ((oy[:, None] >= H) | (ox[None, :] >= W)).long()
    lw = window_partition(label[None, :, :, None], wh, ww)[..., 0]  # (nW, N)
    mask = torch.zeros(lw.shape[0], wh * ww, wh * ww, device=device, dtype=dtype)
    return mask.masked_fill(lw[:, :, None] != lw[:, None, :], RELEASE_MASKED if release else MASKED)


class WindowAttentionV2(nn.Module):
    """Swin V2 (shifted) window attention over a channels-last map.

    Cosine attention: q and k are L2-normalised per head and the logits scaled by
    exp(min(logit_scale, log 100)), a learned per-head scalar. The relative position bias is
    16 * sigmoid(MLP(log-spaced offset)), a 2 -> ``cpb_hidden`` -> heads MLP with ReLU.

    Parameter names follow the Swin V2 release (qkv without bias plus ``q_bias``/``v_bias``,
    ``logit_scale`` (heads, 1, 1), ``cpb_mlp.0``/``cpb_mlp.2``) so released weights map 1:1.

    Args:
        dim: channels; ``dim % num_heads == 0``.
        num_heads: attention heads.
        window_size: configured window (wh, ww).
        shift: shift the windows by half a window (odd blocks of a stage).
        cpb_hidden: hidden width of the position-bias MLP (512 in Swin V2).
        mode: window mode, ``"masked"`` or ``"release"`` (see the module docstring); it
            changes outputs only on maps the window does not tile, never the parameters.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        shift: bool = False,
        cpb_hidden: int = 512,
        mode: str = "masked",
    ):
        super().__init__()
        if mode not in WINDOW_MODES:
            raise ValueError(f"WindowAttentionV2: mode must be one of {WINDOW_MODES}, got {mode!r}")
        if dim % num_heads:
            raise ValueError(f"WindowAttentionV2: width {dim} not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.shift = bool(shift)
        self.mode = mode
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True), nn.Linear(cpb_hidden, num_heads, False)
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self, wh: int, ww: int) -> torch.Tensor:
        """(heads, N, N) position bias of a wh x ww window, in [0, 16]."""
        coords, idx = window_tables(
            wh, ww, *self.window_size, self.q_bias.device, self.cpb_mlp[0].weight.dtype
        )
        table = 16.0 * torch.sigmoid(self.cpb_mlp(coords))  # (M, heads)
        return table[idx].view(wh * ww, wh * ww, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) float -> (B, H, W, dim)."""
        B, H, W, C = x.shape
        wh, ww, sh, sw = effective_window(H, W, self.window_size, self.shift, self.mode)
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        if Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        N, nW, nh, hd = wh * ww, (Hp // wh) * (Wp // ww), self.num_heads, self.head_dim
        xw = window_partition(x, wh, ww)

        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(xw, self.qkv.weight, qkv_bias).view(B, nW, N, 3, nh, hd)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, heads, N, hd)
        # Cosine attention: unit q and k, logits scaled per head. The scale rides on q's
        # normaliser, so q is rescaled in one pass (F.normalize then * scale takes two).
        scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)).to(q.dtype)
        k = F.normalize(k, dim=-1, eps=NORM_EPS)

        # One (1, heads, N, N) position bias for every window plus, where windows are shifted
        # (or, in masked mode, padded), one (nW, 1, N, N) mask per window, applied periodically over the
        # image-major windowed batch (window b reads mask[b % nW]); neither is materialised
        # B * nW times by the fused kernel.
        bias = [self.relative_bias(wh, ww)[None]]
        mask = window_mask(H, W, wh, ww, sh, sw, x.device, bias[0].dtype, self.mode)
        if mask is not None:
            bias.append(mask[:, None])
        out = attention(
            q.reshape(B * nW, nh, N, hd),
            k.reshape(B * nW, nh, N, hd),
            v.reshape(B * nW, nh, N, hd),
            bias=bias,
            scale=1.0,
        )
        out = out.transpose(1, 2).reshape(B * nW, N, C)
        x = window_reverse(self.proj(out), wh, ww, Hp, Wp)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if Hp != H or Wp != W:
            x = x[:, :H, :W]
        return x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, window={self.window_size}, "
            f"shift={self.shift}, mode={self.mode}"
        )

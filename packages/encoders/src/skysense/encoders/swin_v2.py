"""Swin Transformer V2, the HR optical encoder g_HR: post-norm blocks of cosine (shifted)
window attention, patch merging between stages, an extra main-branch norm every few blocks,
and the four stage feature maps as output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skysense.encoders.checkpointing import run_block
from skysense.encoders.drop_path import DropPath
from skysense.encoders.mlp import Mlp
from skysense.encoders.weight_init import init_weights
from skysense.encoders.window_attention import WindowAttentionV2


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(kernel = stride = patch) then LayerNorm.

    (B, C, H, W) -> (B, H / patch, W / patch, dim), channels-last.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2 x 2 neighbourhoods -> one token: concat (4 C), Linear(4 C, 2 C, no bias), LayerNorm.

    The 4 C vector is ordered (row, col, c), channels innermost, so the gather copies whole
    contiguous channel vectors (4-8x faster on the CPU than the channel-major order). The
    Swin V2 release gathers with ``nn.Unfold(2, stride=2)``, channel-major (c, row, col);
    :func:`skysense.encoders.checkpoint_filter_fn` permutes its ``reduction`` columns.
    (B, H, W, C) with even H, W -> (B, H / 2, W / 2, 2 C).
    """

    def __init__(self, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
        return self.norm(self.reduction(x.reshape(B, H // 2, W // 2, 4 * C)))


class SwinV2Block(nn.Module):
    """Post-norm Swin V2 block on a channels-last map:
    x + DropPath(LN(WindowAttn(x))), then x + DropPath(LN(Mlp(x))), then the optional extra
    main-branch LayerNorm (``norm3``; Swin V2-H/G put one every 6 blocks for stability).

    Args:
        dim, num_heads, window_size, shift, cpb_hidden: see :class:`WindowAttentionV2`.
        window_mode: ``"masked"`` or ``"release"``, the attention's ``mode``.
        mlp_ratio: MLP hidden width over ``dim``.
        drop_path: stochastic-depth probability.
        extra_norm: add ``norm3`` at the end of the main branch.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        shift: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        extra_norm: bool = False,
        cpb_hidden: int = 512,
        norm_eps: float = 1e-5,
        window_mode: str = "masked",
    ):
        super().__init__()
        self.attn = WindowAttentionV2(dim, num_heads, window_size, shift, cpb_hidden, window_mode)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps) if extra_norm else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) float -> (B, H, W, dim)."""
        x = x + self.drop_path(self.norm1(self.attn(x)))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        if self.norm3 is not None:
            x = self.norm3(x)
        return x


class SwinV2Stage(nn.Module):
    """Optional patch merging (stages 2..4), then ``depth`` blocks alternating plain and
    shifted windows."""

    def __init__(
        self,
        in_dim: int,
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        downsample: bool,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        extra_norm_period: int,
        cpb_hidden: int,
        norm_eps: float,
        window_mode: str = "masked",
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, norm_eps) if downsample else None
        dim = 2 * in_dim if downsample else in_dim
        self.dim = dim
        self.blocks = nn.ModuleList(
            SwinV2Block(
                dim,
                num_heads,
                window_size,
                shift=i % 2 == 1,
                mlp_ratio=mlp_ratio,
                drop_path=drop_paths[i],
                extra_norm=bool(extra_norm_period) and (i + 1) % extra_norm_period == 0,
                cpb_hidden=cpb_hidden,
                norm_eps=norm_eps,
                window_mode=window_mode,
            )
            for i in range(depth)
        )
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for blk in self.blocks:
            x = run_block(blk, x, enabled=self.checkpointing)
        return x


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 backbone returning every stage's feature map.

    No absolute position embedding (Swin V2). Stage i (0-based) has width
    ``embed_dim * 2**i`` at stride ``patch_size * 2**i``; each output goes through its own
    LayerNorm (``out_norms``, the release's ``norm{i}``).

    Args:
        in_chans: input bands (3 for RGB).
        embed_dim: stage-1 width (352 for Swin V2-H).
        depths: blocks per stage, e.g. (2, 2, 18, 2).
        num_heads: heads per stage, e.g. (8, 16, 32, 64).
        window_size: attention window (int or (h, w)); maps smaller than it use one window.
        patch_size: stride of the patch embedding.
        mlp_ratio: MLP hidden width over the block width.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        extra_norm_period: a main-branch LayerNorm after every this many blocks of a stage
            (0 = none; 6 for Swin V2-H).
        cpb_hidden: hidden width of the continuous position-bias MLP.
        norm_eps: LayerNorm epsilon.
        window_mode: how windows meet maps they do not tile: ``"masked"`` (padding masked
            out, the longer side of a small map still shifted) or ``"release"`` (exactly the
            released weights' mmpretrain code: padding attended to, no shift once a side
            equals the window); see :mod:`skysense.encoders.window_attention`.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 8,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        extra_norm_period: int = 0,
        cpb_hidden: int = 512,
        norm_eps: float = 1e-5,
        window_mode: str = "masked",
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformerV2: {len(depths)} depths but {len(num_heads)} heads")
        ws = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        self.in_chans = in_chans
        self.window_mode = window_mode
        self.patch_size = patch_size
        self.num_stages = len(depths)
        self.dims = tuple(embed_dim * 2**i for i in range(self.num_stages))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm_eps)
        total = sum(depths)
        # Python floats, not torch.linspace: the model must build on the meta device too.
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.stages.append(
                SwinV2Stage(
                    self.dims[max(i - 1, 0)],
                    depth,
                    heads,
                    ws,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    drop_paths=dpr[start : start + depth],
                    extra_norm_period=extra_norm_period,
                    cpb_hidden=cpb_hidden,
                    norm_eps=norm_eps,
                    window_mode=window_mode,
                )
            )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d, eps=norm_eps) for d in self.dims)
        self.apply(init_weights)

    @property
    def stride(self) -> int:
        """Input pixels per stage-4 token: the size multiple the input must have."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    def set_checkpointing(self, enabled: bool = True) -> None:
        for s in self.stages:
            s.checkpointing = enabled

    def forward_channels_last(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, in_chans, H, W) float, H and W multiples of :attr:`stride`.
        Returns the normed stage maps, channels-last: [(B, H_i, W_i, C_i)]."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"SwinTransformerV2: expected (B, {self.in_chans}, H, W); got {tuple(x.shape)}"
            )
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(
                f"SwinTransformerV2: H and W must be multiples of {self.stride} (patch "
                f"{self.patch_size} x 2^{self.num_stages - 1} merges); got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        outs = []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            outs.append(norm(x))
        return outs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, in_chans, H, W) float -> 4 maps (B, C_i, H / (patch 2^i), W / (patch 2^i)).

        The maps are channels-first views of channels-last storage (not contiguous)."""
        return tuple(o.permute(0, 3, 1, 2) for o in self.forward_channels_last(x))

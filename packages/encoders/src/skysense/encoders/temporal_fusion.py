"""Multi-modal temporal fusion: at every location of the fusion grid, one transformer over the
tokens of every modality and time step, read out at a learned extra token (F_fus)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.encoders.block import block_stack
from skysense.encoders.checkpointing import run_block
from skysense.encoders.dtpe import DateSpecificTemporalEncoding
from skysense.encoders.weight_init import init_weights


class TemporalFusion(nn.Module):
    """DTPE, projection C_g -> D_f, extra token, pre-norm blocks with a key padding mask.

    For location s the sequence is [extra, HR, S2_1..S2_T2, S1_1..S1_T1]; padded or missing
    steps are masked out as keys; the extra token never is, so a location whose series is all
    padding still gets F_fus. DTPE row (doy - 1) is added to a token before the projection;
    the projection being linear, that is computed as proj(x) + W DTPE(doy), which never
    materialises the C_g-wide sum (2816 wide at paper size). The last block computes only the
    extra token's output, the only one read.

    Args:
        in_dim: token width C_g (Swin's last stage width, 2816).
        dim: fusion width D_f (1024).
        depth: blocks (24).
        num_heads: heads (16).
        mlp_ratio: MLP hidden width over ``dim`` (4: FFN 4096).
        drop_path_rate: stochastic depth rising linearly from 0 to this (0.3 in the paper).
        days: DTPE rows (365).
        final_norm: LayerNorm on the extra token's output. The release's fusion has none
            (its F_fus is the raw residual stream), hence the default.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        days: int = 365,
        final_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.dim = dim
        self.dtpe = DateSpecificTemporalEncoding(in_dim, days)
        self.proj = nn.Linear(in_dim, dim)
        self.extra_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = block_stack(dim, depth, num_heads, mlp_ratio, drop_path_rate, norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else None
        self.checkpointing = False
        nn.init.trunc_normal_(self.extra_token, std=0.02)
        self.apply(init_weights)

    def set_checkpointing(self, enabled: bool = True) -> None:
        self.checkpointing = enabled

    def forward(
        self,
        tokens: Sequence[torch.Tensor],
        valid: Sequence[torch.Tensor],
        doy: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        """Fuse the modalities' grid tokens.

        Args:
            tokens: per modality (B, T_m, h, w, in_dim) channels-last, same B, h, w.
            valid: per modality (B, T_m) bool, False = padded or missing step.
            doy: per modality (B, T_m) integer day of year 0..366, or None for no DTPE on it.

        Returns:
            F_fus (B, h, w, dim) channels-last.
        """
        B, _, h, w, _ = tokens[0].shape
        parts = [self.extra_token.view(1, 1, 1, 1, self.dim).expand(B, h, w, 1, self.dim)]
        pads = [torch.zeros(B, 1, dtype=torch.bool, device=tokens[0].device)]
        for x, ok, d in zip(tokens, valid, doy):
            z = self.proj(x.permute(0, 2, 3, 1, 4))  # (B, h, w, T_m, dim)
            if d is not None:
                z = z + F.linear(self.dtpe(d), self.proj.weight)[:, None, None]
            parts.append(z)
            pads.append(~ok)
        z = torch.cat(parts, dim=3)
        n = z.shape[3]
        z = z.reshape(B * h * w, n, self.dim)
        pad = torch.cat(pads, dim=1)[:, None, :].expand(B, h * w, n).reshape(B * h * w, n)
        for blk in self.blocks[:-1]:
            z = run_block(blk, z, pad, enabled=self.checkpointing)
        # F_fus is the extra token's output: the last block computes only that token.
        z = run_block(self.blocks[-1].forward_head, z, pad, enabled=self.checkpointing)
        out = z[:, 0]
        if self.norm is not None:
            out = self.norm(out)
        return out.view(B, h, w, self.dim)

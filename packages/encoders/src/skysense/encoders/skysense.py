"""The SkySense factorized multi-modal spatiotemporal encoder."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from skysense.encoders.config import SkySenseConfig
from skysense.encoders.geo_context import GeoContext
from skysense.encoders.grid_align import GridAlign
from skysense.encoders.inputs import check_batch
from skysense.encoders.swin_v2 import SwinTransformerV2
from skysense.encoders.temporal_fusion import TemporalFusion
from skysense.encoders.vit import VisionTransformer
from skysense.kernels.modalities import SERIES

log = logging.getLogger(__name__)


class SkySense(nn.Module):
    """Spatial encoders per modality -> grid alignment -> temporal fusion -> geo-context.

    - ``hr_encoder``: Swin V2 on ``hr``; its stage 4 is the HR token of every grid cell.
    - ``s2_encoder`` / ``s1_encoder``: ViTs on every time step (time folded into the batch);
      ``grid_s2`` / ``grid_s1`` map their last features onto the fusion grid.
    - ``fusion``: DTPE + projection + extra token + pre-norm blocks, masked by step validity.
    - ``geo_context``: region prototypes (buffer, updated by the GCPL EMA) and the read-out.

    Modules of modalities not in ``cfg.modalities`` are None. Build through
    :func:`skysense.encoders.build_skysense`.
    """

    def __init__(self, cfg: SkySenseConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mods = cfg.modalities
        self.hr_encoder = (
            SwinTransformerV2(
                in_chans=cfg.hr_in_chans,
                embed_dim=cfg.swin_embed_dim,
                depths=cfg.swin_depths,
                num_heads=cfg.swin_num_heads,
                window_size=cfg.swin_window_size,
                patch_size=cfg.swin_patch_size,
                mlp_ratio=cfg.swin_mlp_ratio,
                drop_path_rate=cfg.swin_drop_path_rate,
                extra_norm_period=cfg.swin_extra_norm_period,
                cpb_hidden=cfg.swin_cpb_hidden,
                norm_eps=cfg.swin_norm_eps,
                window_mode=cfg.swin_window_mode,
            )
            if "hr" in mods
            else None
        )
        for m in SERIES:
            enc = grid = None
            if m in mods:
                enc = VisionTransformer(
                    in_chans=cfg.s2_in_chans if m == "s2" else cfg.s1_in_chans,
                    img_size=cfg.s_img_size,
                    patch_size=cfg.vit_patch_size,
                    dim=cfg.vit_dim,
                    depth=cfg.vit_depth,
                    num_heads=cfg.vit_num_heads,
                    mlp_ratio=cfg.vit_mlp_ratio,
                    taps=cfg.vit_taps,
                    drop_path_rate=cfg.vit_drop_path_rate,
                    cls_token=cfg.vit_cls_token,
                    norm_eps=cfg.vit_norm_eps,
                    final_norm=cfg.vit_final_norm,
                )
                grid = GridAlign(cfg.vit_dim, cfg.grid_dim, cfg.grid_upscale)
            setattr(self, f"{m}_encoder", enc)
            setattr(self, f"grid_{m}", grid)
        self.fusion = TemporalFusion(
            in_dim=cfg.grid_dim,
            dim=cfg.fusion_dim,
            depth=cfg.fusion_depth,
            num_heads=cfg.fusion_num_heads,
            mlp_ratio=cfg.fusion_mlp_ratio,
            drop_path_rate=cfg.fusion_drop_path_rate,
            days=cfg.dtpe_days,
            final_norm=cfg.fusion_final_norm,
            norm_eps=cfg.fusion_norm_eps,
        )
        self.geo_context = GeoContext(
            cfg.geo_regions, cfg.geo_prototypes, cfg.fusion_dim, cfg.geo_lat_bands
        )
        self.set_checkpointing(cfg.checkpointing)
        log.debug(
            "SkySense '%s': %.2fM learned parameters, prototypes %s, fusion grid C_g=%d",
            cfg.name,
            sum(p.numel() for p in self.parameters()) / 1e6,
            tuple(self.geo_context.prototypes.shape),
            cfg.grid_dim,
        )

    def set_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of every block (Swin, ViTs, fusion) on or off."""
        for enc in (self.hr_encoder, self.s2_encoder, self.s1_encoder, self.fusion):
            if enc is not None:
                enc.set_checkpointing(enabled)

    def forward(self, batch: Mapping[str, torch.Tensor], fuse: bool = True) -> dict:
        """Encode a batch (docs/contracts.md, "Batch") into the encoder output dict.

        Args:
            batch: any non-empty subset of ``hr`` (B, 3, H, W), ``s2`` (B, T2, 10, hs, ws),
                ``s1`` (B, T1, 2, hs, ws) float; optional ``hr_doy`` (B,), ``s2_doy``/``s1_doy``
                (B, T) int64 day of year (0 = unknown/padded); ``s2_valid``/``s1_valid``
                (B, T) bool (absent = every step valid); ``latlon`` (B, 2) float (NaN =
                unknown). H / 32 must equal hs / patch * upscale (the fusion grid h x w).
            fuse: False stops after the spatial encoders and the grid alignment: the
                temporal fusion and the geo-context do not run, and ``fused``, ``geo`` and
                ``region`` are absent (for consumers of ``hr_stages`` or the taps only; under
                DDP their parameters then get no gradient).

        Returns:
            dict (keys of absent modalities absent; views may be non-contiguous):
            ``hr_stages`` 4 x (B, C_i, H / 2^(i+2), W / 2^(i+2)); ``s2_taps``/``s1_taps``
            tuples of (B, T, D_vit, hs / p, ws / p); ``tokens_hr`` (B, 1, C_g, h, w),
            ``tokens_s2``/``tokens_s1`` (B, T, C_g, h, w); ``valid_hr`` (B, 1),
            ``valid_s2``/``valid_s1`` (B, T) bool; ``fused`` (B, D_f, h, w); ``geo``
            (B, 2 D_f, h, w); ``region`` (B,) int64 (-1 = unknown). Taps and tokens of
            padded steps are computed like the others but carry no meaning: the fusion masks
            them out, and consumers should read ``valid_*``.
        """
        B, h, w = check_batch(batch, self.cfg)
        out: dict = {}
        tokens, valid, doys = [], [], []
        dtpe_all = self.cfg.dtpe_mode == "all"

        if "hr" in batch:
            hr = batch["hr"]
            stages = self.hr_encoder.forward_channels_last(hr)
            out["hr_stages"] = tuple(s.permute(0, 3, 1, 2) for s in stages)
            t = stages[-1].unsqueeze(1)  # (B, 1, h, w, C_g)
            ok = torch.ones(B, 1, dtype=torch.bool, device=hr.device)
            out["tokens_hr"] = t.permute(0, 1, 4, 2, 3)
            out["valid_hr"] = ok
            tokens.append(t)
            valid.append(ok)
            hr_doy = batch.get("hr_doy")
            doys.append(hr_doy[:, None] if dtpe_all and hr_doy is not None else None)

        for m in SERIES:
            if m not in batch:
                continue
            x = batch[m]
            T = x.shape[1]
            enc, grid = getattr(self, f"{m}_encoder"), getattr(self, f"grid_{m}")
            taps, last = enc.forward_channels_last(x.flatten(0, 1))
            hp, wp = last.shape[1:3]
            out[f"{m}_taps"] = tuple(
                t.reshape(B, T, hp, wp, t.shape[-1]).permute(0, 1, 4, 2, 3) for t in taps
            )
            t = grid(last).view(B, T, h, w, self.cfg.grid_dim)
            ok = batch.get(f"{m}_valid")
            if ok is None:
                ok = torch.ones(B, T, dtype=torch.bool, device=x.device)
            out[f"tokens_{m}"] = t.permute(0, 1, 4, 2, 3)
            out[f"valid_{m}"] = ok
            tokens.append(t)
            valid.append(ok)
            d = batch.get(f"{m}_doy")
            doys.append(d if (dtpe_all or m == "s2") else None)

        if not fuse:
            return out
        fused = self.fusion(tokens, valid, doys)  # (B, h, w, D_f)
        region = self.geo_context.region(batch.get("latlon"), B, fused.device)
        flat = fused.reshape(B, h * w, -1)
        readout = self.geo_context(flat, region)
        geo = torch.cat([flat, readout], dim=-1).view(B, h, w, -1)
        out["fused"] = fused.permute(0, 3, 1, 2)
        out["geo"] = geo.permute(0, 3, 1, 2)
        out["region"] = region
        return out

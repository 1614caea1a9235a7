"""The configuration of one SkySense encoder: every field documented where it is defined."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from skysense.kernels.modalities import MODALITIES, MODALITY

DTPE_MODES = ("all", "s2")
SWIN_WINDOW_MODES = ("masked", "release")  # skysense.encoders.window_attention.WINDOW_MODES


@dataclass(frozen=True)
class SkySenseConfig:
    """Sizes and input geometry of a SkySense encoder (see :data:`skysense.encoders.PRESETS`).

    Geometry: the fusion grid is Swin's stage 4, ``hr_img_size / (swin_patch_size *
    2**(stages - 1))``, and must equal the series token grid times the upscale,
    ``s_img_size / vit_patch_size * grid_upscale`` (paper: 2048 / 32 = 64 = 64 / 4 * 4). The
    tile sizes are defaults (the ViT position embedding is sized for ``s_img_size``); any input
    whose grids align in the same way is accepted.
    """

    # --- input geometry --------------------------------------------------------------------
    hr_img_size: int = 2048  # default HR tile side, pixels
    s_img_size: int = 64  # default S1/S2 tile side, pixels
    hr_in_chans: int = MODALITY["hr"].channels  # HR bands (R, G, B): 3
    s2_in_chans: int = MODALITY["s2"].channels  # S2 bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12: 10
    s1_in_chans: int = MODALITY["s1"].channels  # S1 bands VV, VH: 2
    modalities: tuple[str, ...] = MODALITIES  # encoders to build; a batch may use any subset
    # --- g_HR: Swin Transformer V2 -----------------------------------------------------------
    swin_patch_size: int = 4  # patch embedding stride
    swin_embed_dim: int = 352  # stage-1 width; stage i has swin_embed_dim * 2**i
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)  # blocks per stage
    swin_num_heads: tuple[int, ...] = (8, 16, 32, 64)  # heads per stage
    swin_window_size: int = 8  # attention window (tokens per side)
    swin_mlp_ratio: float = 4.0  # MLP hidden width over block width
    swin_extra_norm_period: int = 6  # main-branch LayerNorm every n blocks (0 = none)
    swin_drop_path_rate: float = 0.2  # stochastic depth, max over blocks (choice: uncertain)
    swin_cpb_hidden: int = 512  # hidden width of the continuous position-bias MLP
    swin_norm_eps: float = 1e-5  # LayerNorm epsilon of the Swin (mmcls default)
    # Windows on maps they do not tile: "masked" (padding masked out; a side longer than the
    # window still shifts) or "release" (the released weights' mmpretrain code, exactly:
    # padding attended to, no shift once a side equals the window). `skysense convert` sets
    # "release"; results differ only where an input's stage maps are not window multiples.
    swin_window_mode: str = "masked"
    # --- g_MS, g_SAR: ViT (two instances, separate weights) --------------------------------
    vit_patch_size: int = 4  # patch size on the S1/S2 tiles
    vit_dim: int = 1024  # token width
    vit_depth: int = 24  # blocks
    vit_num_heads: int = 16  # heads
    vit_mlp_ratio: float = 4.0  # MLP hidden width over vit_dim
    vit_taps: tuple[int, ...] = (5, 11, 17, 23)  # 0-based blocks returned as s2_taps/s1_taps
    vit_drop_path_rate: float = 0.1  # stochastic depth, max over blocks (choice: uncertain)
    vit_cls_token: bool = True  # class token (the release's mmseg ViT has one)
    vit_norm_eps: float = 1e-6  # LayerNorm epsilon
    vit_final_norm: bool = True  # LayerNorm on the last block (mmseg final_norm; release: none)
    # --- grid alignment (1x1 conv + PixelShuffle) ------------------------------------------
    grid_upscale: int = 4  # PixelShuffle factor from the ViT token grid to the fusion grid
    # --- multi-modal temporal fusion -------------------------------------------------------
    fusion_dim: int = 1024  # D_f
    fusion_depth: int = 24  # pre-norm blocks
    fusion_num_heads: int = 16  # heads
    fusion_mlp_ratio: float = 4.0  # FFN width over D_f (4096 at paper size)
    fusion_drop_path_rate: float = 0.3  # stochastic depth, max over blocks (paper: 0.3)
    fusion_final_norm: bool = False  # LayerNorm on F_fus (the release has none)
    fusion_norm_eps: float = 1e-6  # LayerNorm epsilon
    dtpe_mode: str = "all"  # "all": DTPE on every token (paper); "s2": only S2 (follow-up code)
    dtpe_days: int = 365  # DTPE rows; day 366 uses the last
    # --- attentive geo-context --------------------------------------------------------------
    geo_regions: int = 4096  # N_R regions of the equal-area grid
    geo_prototypes: int = 100  # N_p prototypes per region
    geo_lat_bands: int = 32  # latitude bands of the grid (sectors = N_R / bands)
    # --- training ----------------------------------------------------------------------------
    checkpointing: bool = False  # activation checkpointing per block (recompute in backward)
    name: str = field(default="custom", compare=False)  # preset name, for messages

    @property
    def num_stages(self) -> int:
        return len(self.swin_depths)

    @property
    def grid_dim(self) -> int:
        """C_g: width of the fusion-grid tokens (Swin's last stage width; 2816 at paper size)."""
        return self.swin_embed_dim * 2 ** (self.num_stages - 1)

    @property
    def hr_stride(self) -> int:
        """HR pixels per fusion-grid cell (Swin stage 4): 32 with patch 4 and 4 stages."""
        return self.swin_patch_size * 2 ** (self.num_stages - 1)

    def replace(self, **overrides) -> SkySenseConfig:
        """A copy with ``overrides`` applied (unknown names raise a ValueError)."""
        return SkySenseConfig.from_dict({**asdict(self), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping) -> SkySenseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"SkySense config: unknown field(s) {unknown}; the fields are {sorted(known)}"
            )
        vals = dict(values)
        for k in ("modalities", "swin_depths", "swin_num_heads", "vit_taps"):
            if k in vals and not isinstance(vals[k], str):
                vals[k] = tuple(vals[k])  # Hydra hands lists over
        cfg = cls(**vals)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise a ValueError naming the field(s) when the configuration cannot work."""
        where = f"SkySense config '{self.name}'"
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"{where}: modalities must be a non-empty subset of {MODALITIES}")
        for name in ("vit_depth", "fusion_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be at least 1")
        if not self.swin_depths or min(self.swin_depths) < 1:
            raise ValueError(f"{where}: swin_depths must be positive, got {self.swin_depths}")
        if len(self.swin_depths) != len(self.swin_num_heads):
            raise ValueError(f"{where}: swin_depths and swin_num_heads differ in length")
        for i, h in enumerate(self.swin_num_heads):
            width = self.swin_embed_dim * 2**i
            if width % h:
                raise ValueError(f"{where}: Swin stage {i} width {width} not divisible by {h}")
        for name, dim, heads in (
            ("vit", self.vit_dim, self.vit_num_heads),
            ("fusion", self.fusion_dim, self.fusion_num_heads),
        ):
            if dim % heads:
                raise ValueError(f"{where}: {name}_dim {dim} not divisible by {heads} heads")
        if any(t < 0 or t >= self.vit_depth for t in self.vit_taps):
            raise ValueError(f"{where}: vit_taps {self.vit_taps} outside 0..{self.vit_depth - 1}")
        if self.dtpe_mode not in DTPE_MODES:
            raise ValueError(f"{where}: dtpe_mode must be one of {DTPE_MODES}")
        if self.swin_window_mode not in SWIN_WINDOW_MODES:
            raise ValueError(
                f"{where}: swin_window_mode must be one of {SWIN_WINDOW_MODES}, got "
                f"{self.swin_window_mode!r}"
            )
        if self.geo_regions % self.geo_lat_bands:
            raise ValueError(
                f"{where}: geo_regions {self.geo_regions} is not a multiple of "
                f"geo_lat_bands {self.geo_lat_bands}"
            )
        if self.hr_img_size % self.hr_stride:
            raise ValueError(
                f"{where}: hr_img_size {self.hr_img_size} is not a multiple of {self.hr_stride} "
                f"(Swin patch {self.swin_patch_size} x 2^{self.num_stages - 1} merges)"
            )
        if self.s_img_size % self.vit_patch_size:
            raise ValueError(
                f"{where}: s_img_size {self.s_img_size} is not a multiple of vit_patch_size "
                f"{self.vit_patch_size}"
            )
        hr_grid = self.hr_img_size // self.hr_stride
        s_grid = self.s_img_size // self.vit_patch_size * self.grid_upscale
        if hr_grid != s_grid:
            raise ValueError(
                f"{where}: the fusion grids do not align: HR {self.hr_img_size} / "
                f"{self.hr_stride} (Swin stage 4) = {hr_grid}, but S {self.s_img_size} / "
                f"patch {self.vit_patch_size} x upscale {self.grid_upscale} = {s_grid}"
            )

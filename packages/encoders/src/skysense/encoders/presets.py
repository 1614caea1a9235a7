"""Size presets of the one SkySense builder: tiny, small, base, large, huge (= the paper).

Each preset is written below as the fields in which it differs from the paper's model (the
:class:`~skysense.encoders.config.SkySenseConfig` defaults); :data:`PRESETS` holds the complete,
validated field dicts. ``build_skysense(preset, **overrides)`` applies overrides on top,
validates, and builds.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from skysense.encoders.config import SkySenseConfig

_DIFFERENCES: dict[str, dict[str, Any]] = {
    # Tests and CPU training (~2 M parameters). Geometry of the embedded sample: HR 128 px at
    # 1.25 m over S 16 px at 10 m (8 HR px per S px); window 4 so the stage grids 32/16/8/4
    # tile exactly; 4 x 4 ViT tokens, upscale 1 -> 4 x 4 fusion grid.
    "tiny": dict(
        hr_img_size=128,
        s_img_size=16,
        swin_embed_dim=32,
        swin_depths=(1, 1, 2, 1),
        swin_num_heads=(1, 2, 4, 8),
        swin_window_size=4,
        swin_extra_norm_period=0,
        swin_drop_path_rate=0.0,
        swin_cpb_hidden=64,
        vit_dim=64,
        vit_depth=4,
        vit_num_heads=2,
        vit_taps=(0, 1, 2, 3),
        vit_drop_path_rate=0.0,
        grid_upscale=1,
        fusion_dim=64,
        fusion_depth=2,
        fusion_num_heads=2,
        fusion_drop_path_rate=0.1,
        geo_regions=64,
        geo_prototypes=16,
        geo_lat_bands=8,
    ),
    # Swin V2-T / ViT-S sizes, same ground geometry as tiny (HR 8x finer than S).
    "small": dict(
        hr_img_size=256,
        s_img_size=32,
        swin_embed_dim=96,
        swin_depths=(2, 2, 6, 2),
        swin_num_heads=(3, 6, 12, 24),
        swin_extra_norm_period=0,
        swin_drop_path_rate=0.1,
        vit_dim=384,
        vit_depth=12,
        vit_num_heads=6,
        vit_taps=(2, 5, 8, 11),
        grid_upscale=1,
        fusion_dim=384,
        fusion_depth=6,
        fusion_num_heads=6,
        fusion_drop_path_rate=0.1,
        geo_regions=1024,
        geo_prototypes=50,
        geo_lat_bands=16,
    ),
    # Swin V2-B / ViT-B sizes, same ground geometry as tiny.
    "base": dict(
        hr_img_size=512,
        s_img_size=64,
        swin_embed_dim=128,
        swin_depths=(2, 2, 18, 2),
        swin_num_heads=(4, 8, 16, 32),
        swin_extra_norm_period=0,
        swin_drop_path_rate=0.2,
        vit_dim=768,
        vit_depth=12,
        vit_num_heads=12,
        vit_taps=(2, 5, 8, 11),
        grid_upscale=1,
        fusion_dim=768,
        fusion_depth=12,
        fusion_num_heads=12,
        fusion_drop_path_rate=0.2,
        # a quarter of the paper's regions, half its prototypes: 157 MB instead of 1.3 GB
        geo_regions=1024,
        geo_prototypes=50,
        geo_lat_bands=16,
    ),
    # The paper's smaller variant: Swin V2-L (~197 M) for HR, otherwise the paper's model.
    "large": dict(
        swin_embed_dim=192,
        swin_depths=(2, 2, 18, 2),
        swin_num_heads=(6, 12, 24, 48),
        swin_extra_norm_period=0,
    ),
    # The paper: Swin V2-H (~654 M), two ViT-L (~302 M each), fusion with grid heads (~398 M),
    # 4096 x 100 prototypes; HR 2048 px, S 64 px, patch 4, upscale 4 -> 64 x 64 grid.
    "huge": dict(),
}

# preset name -> every SkySenseConfig field (validated at import).
PRESETS: dict[str, dict[str, Any]] = {
    name: asdict(SkySenseConfig.from_dict({**fields, "name": name}))
    for name, fields in _DIFFERENCES.items()
}


def preset_config(preset: str, **overrides) -> SkySenseConfig:
    """The validated config of ``preset`` with ``overrides`` (field=value) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown SkySense preset '{preset}'; presets: {sorted(PRESETS)}")
    return SkySenseConfig.from_dict({**PRESETS[preset], **overrides, "name": preset})


def build_skysense(preset: str = "tiny", weights=None, *, strict: bool = True, **overrides):
    """Build a :class:`~skysense.encoders.skysense.SkySense` from a preset.

    Args:
        preset: one of :data:`PRESETS` ("tiny", "small", "base", "large", "huge").
        weights: optional weights to load: a weights folder (``skysense convert`` /
            ``skysense export format=safetensors``: ``model.safetensors``, ``config.json``,
            ``SHA256SUMS``, checked) or a ``.pth`` file (released names or this project's;
            read with ``torch.load(weights_only=True)`` only). A folder's ``config.json``
            fields (``model``) build the structure it was written for, under ``overrides``.
            See :func:`skysense.encoders.weights.load_into`.
        strict: with ``weights``, raise a ValueError naming every missing, unexpected or
            mis-shaped key of the parts the weights hold (parts they lack are logged).
        **overrides: config fields to change, e.g. ``checkpointing=True``,
            ``fusion_depth=2``, ``modalities=("s2", "s1")``.

    Build the big presets on the meta device to count parameters without allocating them:
    ``with torch.device("meta"): build_skysense("huge")``.
    """
    from skysense.encoders.skysense import SkySense

    structure = {}
    if weights is not None:
        from skysense.encoders.weights import structure_of

        structure = structure_of(weights, preset)  # a folder's own fields (convert / export)
    model = SkySense(preset_config(preset, **{**structure, **overrides}))
    if weights is not None:
        from skysense.encoders.weights import load_into

        load_into(model, weights, strict=strict)
    return model

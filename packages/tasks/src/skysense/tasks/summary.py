"""`skysense encoders --summary model=<preset>`: an encoder preset's parameter counts.

The model is built on the ``meta`` device (shapes only, nothing allocated), so even the huge
preset (~2 B parameters and buffers) is counted in a second or two. For the presets the paper
reports (huge, and large's Swin V2-L), each part is printed beside the paper's figure with the
relative difference.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# What each row counts (see skysense.encoders.count_parameters).
DESCRIPTIONS = {
    "hr_encoder": "HR encoder, Swin V2",
    "s2_encoder": "S2 encoder, ViT",
    "s1_encoder": "S1 encoder, ViT",
    "fusion_with_grid_heads": "fusion + grid heads",
    "total": "total learned",
    "geo_prototypes": "geo prototypes (buffer)",
}


def summary_rows(preset: str, checkpointing: bool = False, overrides: dict | None = None):
    """[(part, description, ours, paper or None, difference % or None)] for a preset."""
    import torch

    from skysense.encoders import build_skysense, count_parameters
    from skysense.encoders.parameter_count import (
        PAPER_PARAMETER_COUNTS,
        PAPER_PARAMETER_COUNTS_LARGE,
    )

    with torch.device("meta"):
        model = build_skysense(preset, checkpointing=checkpointing, **(overrides or {}))
    counts = count_parameters(model)
    paper = {"huge": PAPER_PARAMETER_COUNTS, "large": PAPER_PARAMETER_COUNTS_LARGE}.get(preset, {})
    if overrides:
        paper = {}  # the paper's figures describe the presets as they are
    rows = []
    for part, n in counts.items():
        ref = paper.get(part)
        diff = None if ref is None else 100.0 * (n - ref) / ref
        rows.append((part, DESCRIPTIONS.get(part, part), n, ref, diff))
    return rows, model.cfg


def main(cfg, command: str = "encoders") -> int:
    from omegaconf import OmegaConf

    overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True) or {}
    try:
        rows, mcfg = summary_rows(cfg.model.preset, bool(cfg.model.checkpointing), overrides)
    except ValueError as e:
        from skysense.tasks.errors import ConfigError

        raise ConfigError("model", str(e)) from e
    print(f"SkySense encoder preset '{cfg.model.preset}' (parameters counted on the meta device)")
    print(
        f"  HR {mcfg.hr_img_size} px, S {mcfg.s_img_size} px, ViT patch {mcfg.vit_patch_size}, "
        f"upscale {mcfg.grid_upscale} -> fusion grid "
        f"{mcfg.hr_img_size // mcfg.hr_stride} x {mcfg.hr_img_size // mcfg.hr_stride}, "
        f"C_g {mcfg.grid_dim}, D_f {mcfg.fusion_dim}"
    )
    print(f"  {'part':<26} {'ours':>14} {'paper':>10} {'diff':>8}")
    for _, desc, n, ref, diff in rows:
        ref_s = "-" if ref is None else f"{ref / 1e6:,.0f}M"
        diff_s = "-" if diff is None else f"{diff:+.2f}%"
        print(f"  {desc:<26} {n / 1e6:>13,.2f}M {ref_s:>10} {diff_s:>8}")
    print(
        "  fusion + grid heads = temporal fusion (DTPE table, C_g -> D_f projection, extra "
        "token, blocks) + the S2 and S1 grid-alignment heads (1x1 conv weights and biases)."
    )
    return 0

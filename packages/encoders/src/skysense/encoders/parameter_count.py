"""Parameter counts per part of a SkySense encoder, beside the paper's."""

from __future__ import annotations

from torch import nn

# The paper's counts for the huge preset (CVPR 2024, section 3 and its tables).
PAPER_PARAMETER_COUNTS: dict[str, float] = {
    "hr_encoder": 654e6,  # Swin V2-H
    "s2_encoder": 302e6,  # ViT-L
    "s1_encoder": 302e6,  # ViT-L
    "fusion_with_grid_heads": 398e6,  # temporal fusion + both grid-alignment heads
}
# The smaller variant's HR encoder (Swin V2-L), the "large" preset.
PAPER_PARAMETER_COUNTS_LARGE: dict[str, float] = {"hr_encoder": 197e6}


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Learned parameters per part of a :class:`~skysense.encoders.SkySense` (works on the
    meta device: only shapes are read).

    Parts: ``hr_encoder`` (Swin V2), ``s2_encoder`` and ``s1_encoder`` (ViTs, each with its
    patch embedding, class token, position embedding, blocks and final norm),
    ``fusion_with_grid_heads`` (the two grid-alignment heads ``grid_s2``/``grid_s1``, 1x1 conv
    weights and biases, plus the whole temporal fusion: the DTPE table, the C_g -> D_f
    projection, the extra token and every block), ``total`` (every learned parameter), and
    ``geo_prototypes``: the N_R x N_p x D_f prototype bank, a buffer updated by the GCPL EMA,
    counted apart because it is not learned by gradient.
    """
    counts = {
        "hr_encoder": _numel(model.hr_encoder),
        "s2_encoder": _numel(model.s2_encoder),
        "s1_encoder": _numel(model.s1_encoder),
        "fusion_with_grid_heads": _numel(model.fusion)
        + _numel(model.grid_s2)
        + _numel(model.grid_s1),
        "total": _numel(model),
        "geo_prototypes": model.geo_context.prototypes.numel(),
    }
    return counts

"""skysense.encoders: the SkySense factorized multi-modal spatiotemporal encoder.

Public entry points: :data:`PRESETS` (preset name -> config fields), :func:`build_skysense`
(preset, **overrides) -> :class:`SkySense`, ``SkySense.forward(batch) -> dict`` (the batch and
output contracts of docs/contracts.md), and :func:`checkpoint_filter_fn` for the released
weights. The building blocks (Swin V2, ViT, grid alignment, DTPE, temporal fusion,
geo-context) are importable on their own.
"""

from skysense.encoders.checkpoint_filter import checkpoint_filter_fn, map_released_keys
from skysense.encoders.config import SkySenseConfig
from skysense.encoders.dtpe import DateSpecificTemporalEncoding
from skysense.encoders.geo_context import GeoContext, latlon_to_region
from skysense.encoders.grid_align import GridAlign
from skysense.encoders.parameter_count import PAPER_PARAMETER_COUNTS, count_parameters
from skysense.encoders.presets import PRESETS, build_skysense, preset_config
from skysense.encoders.skysense import SkySense
from skysense.encoders.swin_v2 import SwinTransformerV2
from skysense.encoders.temporal_fusion import TemporalFusion
from skysense.encoders.vit import VisionTransformer

__all__ = [
    "PRESETS",
    "PAPER_PARAMETER_COUNTS",
    "DateSpecificTemporalEncoding",
    "GeoContext",
    "GridAlign",
    "SkySense",
    "SkySenseConfig",
    "SwinTransformerV2",
    "TemporalFusion",
    "VisionTransformer",
    "build_skysense",
    "checkpoint_filter_fn",
    "count_parameters",
    "latlon_to_region",
    "map_released_keys",
    "preset_config",
]

"""``huggingface_hub`` support: :class:`SkySenseHub`, a SkySense encoder with
``PyTorchModelHubMixin``, so that ``SkySenseHub.from_pretrained(DIR_or_HUB_ID)`` reads a weights
folder (:mod:`skysense.encoders.weights`: ``skysense convert`` or ``skysense export
format=safetensors``) from disk, offline, or the same files from the Hub where a network
exists; ``save_pretrained`` writes the same layout's two files.

Needs ``huggingface_hub`` (not a dependency of skysense-encoders; timm brings it).
"""

from __future__ import annotations

from pathlib import Path

try:
    from huggingface_hub import PyTorchModelHubMixin
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "skysense.encoders.hub needs huggingface_hub: pip install huggingface_hub"
    ) from e

from skysense.encoders.presets import preset_config
from skysense.encoders.skysense import SkySense
from skysense.encoders.weights import SUMS_FILE, load_into


class SkySenseHub(SkySense, PyTorchModelHubMixin, library_name="skysense"):
    """A SkySense encoder built from a weights folder's ``config.json`` (``preset`` and
    ``model``, the encoder config fields) and loaded strictly through
    :func:`skysense.encoders.weights.load_into` (release names or ours; the encoder of a
    fine-tuned task model's folder through its ``encoder_prefix``; checked against
    ``SHA256SUMS`` where the folder has one).

    Args:
        preset: the preset the folder was written for.
        model: encoder config fields over the preset (``config.json``'s ``model``).
        **config: the rest of ``config.json`` (format, sources, sensors, ...), kept as
            :attr:`weights_config`.
    """

    def __init__(self, preset: str = "tiny", model: dict | None = None, **config):
        fields = {k: v for k, v in (model or {}).items() if k not in ("name", "checkpointing")}
        super().__init__(preset_config(preset, **fields))
        self.weights_config = dict(config, preset=preset)

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        folder = Path(model_file).parent
        load_into(model, folder, strict=True, verify=(folder / SUMS_FILE).is_file())
        return model.to(map_location).eval()

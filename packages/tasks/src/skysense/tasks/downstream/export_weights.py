"""`skysense export format=safetensors`: this project's checkpoints as a weights folder.

The folder (``model.safetensors``, ``config.json``, ``SHA256SUMS``; the layout of
:mod:`skysense.encoders.weights`, the same as ``skysense convert`` writes) holds:

- from a pre-training checkpoint: the encoder (``encoder_key``: teacher or student), config
  ``preset`` / ``model`` (every encoder config field), so that
  ``build_skysense(preset, weights=DIR)`` rebuilds and loads it;
- from a fine-tuned model file: the whole task model's state dict, ``encoder_prefix`` (where
  the encoder's keys start: the encoder alone loads from it too), ``kind`` and ``finetuned``
  (the file's meta: head, classes, inputs with bands and normalisation).

Files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)


def _plain(x):
    """JSON-safe copy (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(x, default=str))


def encoder_prefix(state: dict) -> str | None:
    """Where a SkySense encoder's keys start in a task model's state dict ('' for the encoder
    itself), found by the fusion's extra token (every SkySense has one); None if none."""
    hits = sorted(
        k[: -len("fusion.extra_token")] for k in state if k.endswith("fusion.extra_token")
    )
    return hits[0] if hits else None


def export_weights(cfg) -> dict:
    """Write ``cfg.checkpoint``'s weights to the folder ``cfg.out``; returns the report."""
    from skysense.encoders.presets import preset_config
    from skysense.encoders.weights import is_weights_dir, read_state_dict, save_weights, sha256_file
    from skysense.tasks.downstream.checkpoint import FORMAT
    from skysense.tasks.errors import ConfigError

    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint",
            "format=safetensors writes a checkpoint's weights: give checkpoint=MODEL (a "
            "pre-training checkpoint or a fine-tuned model file)",
        )
    src = Path(str(cfg.checkpoint)).expanduser()
    if is_weights_dir(src):
        raise ConfigError("checkpoint", f"{src} is a weights folder already")
    obj, _ = read_state_dict(src)
    config: dict = {"source": {"file": src.name, "sha256": sha256_file(src)}}
    if obj.get("format") == FORMAT:
        meta = obj["meta"]
        state = obj["state_dict"]
        prefix = encoder_prefix(state)
        if prefix is None:
            raise ValueError(f"{src}: no SkySense encoder in its state dict")
        preset, overrides = meta["preset"], dict(meta.get("overrides") or {})
        config.update(kind=meta["kind"], encoder_prefix=prefix, finetuned=_plain(meta))
    elif cfg.encoder_key in obj and isinstance(obj[cfg.encoder_key], dict):
        state = obj[cfg.encoder_key]
        model_cfg = (obj.get("config") or {}).get("model") or {}
        if "preset" not in model_cfg:
            raise ValueError(f"{src}: records no config['model']['preset'] to rebuild it with")
        preset, overrides = model_cfg["preset"], dict(model_cfg.get("overrides") or {})
        config.update(kind="encoder", encoder_key=cfg.encoder_key)
    if "sensors" not in config:
        from skysense.tasks.convert import sensor_specs

        config["sensors"] = sensor_specs(preset_config(preset, **overrides).modalities)
    else:
        raise ValueError(
            f"{src}: neither a fine-tuned model file nor a pre-training checkpoint with "
            f"'{cfg.encoder_key}' (released .pth files go through `skysense convert`)"
        )
    fields = asdict(preset_config(preset, **overrides))
    fields.pop("checkpointing", None)
    config.update(preset=preset, overrides=_plain(overrides), model=_plain(fields))
    out = Path(str(cfg.out)).expanduser()
    save_weights(out, state, config)
    log.info("wrote %s (%d tensors)", out, len(state))
    return {
        "format": "safetensors",
        "out": str(out),
        "kind": config["kind"],
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values())),
        "preset": preset,
        "files": sorted(p.name for p in out.iterdir()),
    }

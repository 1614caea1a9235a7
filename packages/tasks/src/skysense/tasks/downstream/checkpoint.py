"""Encoders for fine-tuning: built at random or from a pre-training checkpoint, and the
fine-tuned model files that `skysense evaluate`, `infer` and `export` read.

A pre-training checkpoint (written by `skysense pretrain`) is a ``torch.save``'d dict with
``"student"`` and ``"teacher"`` (SkySense state dicts) and ``"config"`` (the composed config as
a plain dict; ``config["model"]["preset"]`` and ``config["model"]["overrides"]`` rebuild the
encoder). Fine-tuning reads the teacher by default. Loading is strict: every missing,
unexpected or mis-shaped key is listed, and an error is raised unless ``strict=False``.

A fine-tuned model file (written by `skysense finetune`) holds ``"format"`` (:data:`FORMAT`),
``"state_dict"`` (the task model's), and ``"meta"``: everything needed to rebuild the model
without data (encoder preset and overrides, task kind, feature source, head options, feature
channels, class names) and to feed it (the input modality, bands and normalisation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "skysense-finetuned/1"


class CheckpointMismatch(ValueError):
    """A state dict does not fit the model it is loaded into."""


def torch_load(path: str | Path) -> dict:
    """A checkpoint or model file as a dict, loaded on the CPU with ``weights_only=True`` only
    (a file holding other Python objects is refused: unpickling it could run code).

    Raises:
        CheckpointError: one line naming the path and the reason.
    """
    from skysense.tasks.training.checkpoint import CheckpointError, safe_load

    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


def compare_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``model.state_dict()``."""
    own = model.state_dict()
    return {
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
        "shape": sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state
            and hasattr(state[k], "shape")
            and tuple(state[k].shape) != tuple(own[k].shape)
        ),
    }


def _describe(report: dict[str, list], limit: int = 12) -> str:
    lines = []
    for kind, keys in report.items():
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            lines.append(f"{len(keys)} {kind}: " + ", ".join(keys[:limit]) + more)
    return "; ".join(lines)


def load_state(model: nn.Module, state: Mapping, source: str, strict: bool = True) -> dict:
    """Load ``state`` into ``model``; raise :class:`CheckpointMismatch` naming ``source`` and the
    offending keys when strict, else log them. Returns the report."""
    report = compare_state_dict(model, state)
    if any(report.values()):
        msg = f"{source} does not match the model: {_describe(report)}"
        if strict:
            raise CheckpointMismatch(msg)
        log.warning("%s (loading the matching keys only: strict=False)", msg)
    own = model.state_dict()
    ok = {
        k: v
        for k, v in state.items()
        if k in own and (not hasattr(v, "shape") or tuple(v.shape) == tuple(own[k].shape))
    }
    model.load_state_dict(ok, strict=False)
    log.info("loaded %d tensors from %s", len(ok), source)
    return report


def build_encoder(
    preset: str,
    overrides: Mapping | None = None,
    checkpoint: str | Path | None = None,
    key: str = "teacher",
    strict: bool = True,
    checkpointing: bool = False,
) -> tuple[nn.Module, dict]:
    """A SkySense encoder, random (``checkpoint=None``) or from a pre-training checkpoint.

    With a checkpoint, the encoder is rebuilt from the checkpoint's own ``config["model"]``
    (preset and overrides; a different ``preset`` argument is overridden, with a warning) and
    its ``key`` state dict ("teacher" or "student") is loaded strictly. A weights folder
    (``skysense convert`` / ``export format=safetensors``) builds the preset its
    ``config.json`` names (likewise with a warning) and its structure fields, under
    ``overrides``.

    Returns:
        (encoder, info): info holds ``preset``, ``overrides``, ``checkpoint``, ``key`` and the
        load report.
    """
    from skysense.encoders import build_skysense

    overrides = dict(overrides or {})
    info: dict = {"preset": preset, "overrides": overrides, "checkpoint": None, "key": None}
    state = None
    if checkpoint and _is_weights_dir(checkpoint):
        # A weights folder (skysense convert / export format=safetensors): its config.json
        # builds the structure it holds; names are mapped and loaded strictly by the encoders.
        theirs = _folder_preset(checkpoint)
        if theirs is not None and theirs != preset:
            log.warning(
                "weights folder %s holds preset %r; building that (not %r)",
                checkpoint,
                theirs,
                preset,
            )
            preset = theirs
            info["preset"] = preset
        kwargs = dict(overrides, checkpointing=True) if checkpointing else dict(overrides)
        encoder = build_skysense(preset, weights=checkpoint, strict=strict, **kwargs)
        # the folder's structure is the model's: recorded, a fine-tuned file rebuilds it
        from skysense.encoders.weights import structure_of

        overrides = {**structure_of(Path(str(checkpoint)).expanduser(), preset), **overrides}
        info.update(checkpoint=str(checkpoint), key="weights folder", overrides=overrides)
        return encoder, info
    if checkpoint:
        ckpt = torch_load(checkpoint)
        if "format" in ckpt and ckpt["format"] == FORMAT:
            raise ValueError(
                f"{checkpoint} is a fine-tuned model file, not a pre-training checkpoint: "
                "start fine-tuning from the pre-training checkpoint, or evaluate / infer / "
                "export this file"
            )
        if key not in ckpt:
            raise KeyError(
                f"checkpoint {checkpoint} has no {key!r} state dict (keys: {sorted(ckpt)}); "
                "choose encoder_key=student or teacher"
            )
        model_cfg = (ckpt.get("config") or {}).get("model") or {}
        if "preset" in model_cfg:
            if model_cfg["preset"] != preset or dict(model_cfg.get("overrides") or {}) != overrides:
                log.warning(
                    "checkpoint %s was trained with preset %r overrides %s; building that "
                    "(not %r %s)",
                    checkpoint,
                    model_cfg["preset"],
                    model_cfg.get("overrides"),
                    preset,
                    overrides,
                )
            preset = model_cfg["preset"]
            overrides = dict(model_cfg.get("overrides") or {})
        else:
            log.warning(
                "checkpoint %s records no config['model']; using preset %r", checkpoint, preset
            )
        state = ckpt[key]
        info.update(preset=preset, overrides=overrides, checkpoint=str(checkpoint), key=key)
    kwargs = dict(overrides)
    if checkpointing:
        kwargs["checkpointing"] = True
    encoder = build_skysense(preset, **kwargs)
    if state is not None:
        info["report"] = load_state(encoder, state, f"checkpoint {checkpoint} [{key!r}]", strict)
    return encoder, info


def _folder_preset(path) -> str | None:
    """The preset a weights folder's ``config.json`` names, or None (none named, unreadable:
    the encoders' loader then says what is wrong)."""
    import json

    try:
        config = json.loads((Path(str(path)).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    preset = config.get("preset") if isinstance(config, dict) else None
    return preset if isinstance(preset, str) else None


def is_finetuned(path) -> bool:
    """Whether ``path`` (a file or a weights folder) holds a fine-tuned task model."""
    if _is_weights_dir(path):
        import json

        cfg = json.loads((Path(str(path)).expanduser() / "config.json").read_text() or "{}")
        return isinstance(cfg, dict) and "finetuned" in cfg
    return torch_load(path).get("format") == FORMAT


def _is_weights_dir(path) -> bool:
    from skysense.encoders.weights import is_weights_dir

    return is_weights_dir(Path(str(path)).expanduser())


def _finetuned_from_folder(path) -> dict:
    """A weights folder written from a fine-tuned model file (``skysense export
    format=safetensors``) in the form of that file: format, state_dict, meta."""
    from skysense.encoders.weights import load_weights

    state, config = load_weights(Path(str(path)).expanduser())
    if "finetuned" not in config:
        kind = config.get("kind", "encoder")
        raise CheckpointMismatch(
            f"{path} is a weights folder of a{'n' if kind[0] in 'aeiou' else ''} {kind}, not of "
            "a fine-tuned model: fine-tune from it (checkpoint=...), then evaluate / infer / "
            "export the result"
        )
    return {"format": FORMAT, "state_dict": state, "meta": config["finetuned"]}


def save_finetuned(path: str | Path, model: nn.Module, meta: Mapping) -> Path:
    """Write a fine-tuned model file atomically (temporary name, then rename)."""
    from skysense.tasks.training.checkpoint import atomic_write_bytes

    path = Path(path)
    obj = {"format": FORMAT, "state_dict": model.state_dict(), "meta": dict(meta)}
    atomic_write_bytes(path, lambda f: torch.save(obj, f))
    return path


def load_finetuned(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild and load a model written by :func:`save_finetuned`. Returns (model in eval mode,
    meta)."""
    from skysense.encoders import build_skysense
    from skysense.tasks.downstream.heads.detection import SkySenseFasterRCNN
    from skysense.tasks.downstream.model import TaskModel

    obj = _finetuned_from_folder(path) if _is_weights_dir(path) else torch_load(path)
    if obj.get("format") != FORMAT:
        hint = " (a pre-training checkpoint: fine-tune it first)" if "teacher" in obj else ""
        raise ValueError(
            f"{path} is not a fine-tuned SkySense model file{hint}; keys {sorted(obj)}"
        )
    meta = obj["meta"]
    encoder = build_skysense(meta["preset"], **dict(meta.get("overrides") or {}))
    head = dict(meta.get("head") or {})
    if meta["kind"] == "detection":
        model = SkySenseFasterRCNN(encoder, meta["channels"], meta["n_classes"], **head)
    else:
        if meta.get("temporal") == "ltae":  # per-date maps aggregated by L-TAE
            from skysense.tasks.downstream.temporal import TemporalTaskModel as TaskModel
        model = TaskModel(
            encoder, meta["kind"], meta["source"], meta["n_classes"], meta["channels"], **head
        )
    load_state(model, obj["state_dict"], f"fine-tuned model {path}", strict=True)
    return model.eval(), meta

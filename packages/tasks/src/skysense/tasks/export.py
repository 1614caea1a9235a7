"""`skysense export checkpoint=MODEL [out=DIR] [format=program|safetensors]`.

``format=program`` (default): an encoder with its task head as a ``torch.export`` program (and
ONNX where the exporter takes it), checked against eager; see
:mod:`skysense.tasks.downstream.export`. ``format=safetensors``: the checkpoint's weights as a
weights folder (``model.safetensors``, ``config.json``, ``SHA256SUMS``; the layout of
``skysense convert``, :mod:`skysense.encoders.weights`), read by every ``checkpoint=`` /
``weights=`` and by ``huggingface_hub``'s ``PyTorchModelHubMixin.from_pretrained``
(:class:`skysense.encoders.hub.SkySenseHub`)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from skysense.kernels.modalities import MODALITIES


def main(cfg, command: str = "export") -> int:
    from skysense.tasks.downstream.errors import as_config_errors

    with as_config_errors("export"):
        report = _export(cfg)
    print(json.dumps(report, indent=1))
    return 0


FORMATS = ("program", "safetensors")
# Head kinds `export format=program` can trace (detection: see _export).
PROGRAM_KINDS = ("classification", "multilabel", "segmentation", "change")


def _export(cfg) -> dict:
    import torch

    from skysense.tasks.errors import ConfigError

    fmt = str(cfg.get("format") or "program")
    if fmt not in FORMATS:
        raise ConfigError("format", f"one of {list(FORMATS)}, got '{fmt}'")
    if fmt == "safetensors":
        from skysense.tasks.downstream.export_weights import export_weights

        return export_weights(cfg)

    from skysense.tasks.downstream.checkpoint import (
        build_encoder,
        is_finetuned,
        load_finetuned,
    )
    from skysense.tasks.downstream.data import _sensor_inputs
    from skysense.tasks.downstream.export import example_inputs, export_model, input_names
    from skysense.tasks.downstream.model import build_task_model

    ckpt = cfg.checkpoint
    if ckpt and is_finetuned(ckpt):
        model, meta = load_finetuned(ckpt)
    else:
        h = cfg.head
        from skysense.tasks.downstream.datasets.manifest import SPEC_SENSORS

        if h.kind == "detection":
            raise ConfigError(
                "head.kind",
                "detection cannot be exported as a program (torchvision's Faster R-CNN "
                "has data-dependent proposal counts); export its weights with "
                "format=safetensors checkpoint=MODEL, or choose " + " | ".join(PROGRAM_KINDS),
            )
        if h.kind not in PROGRAM_KINDS:
            raise ConfigError("head.kind", f"one of {list(PROGRAM_KINDS)}, got '{h.kind}'")

        sensors = {**SPEC_SENSORS, **OmegaConf.to_container(h.sensors, resolve=True)}
        bad = [m for m in h.modalities if m not in SPEC_SENSORS]
        if not h.modalities or bad:
            raise ConfigError(
                "head.modalities", f"a non-empty subset of [hr, s2, s1], got {list(h.modalities)}"
            )
        mods = [m for m in MODALITIES if m in h.modalities]
        source = h.features if h.features != "auto" else (mods[0] if len(mods) == 1 else "fused")
        ref = source if source in mods else next(m for m in ("s2", "s1", "hr") if m in mods)
        inputs = _sensor_inputs({m: sensors[m] for m in mods}, ref)
        encoder, info = build_encoder(
            cfg.model.preset,
            OmegaConf.to_container(cfg.model.overrides, resolve=True),
            ckpt or None,
            cfg.encoder_key,
        )
        names = input_names(h.kind, mods)
        size = int(cfg.size or 64)
        args = example_inputs(
            names, inputs, size, 1, cfg.steps, 8, torch.Generator().manual_seed(cfg.seed)
        )
        example = _as_batch(h.kind, names, args)
        model = build_task_model(
            encoder, h.kind, source, h.n_classes, example, head_channels=h.channels
        )
        meta = {"kind": h.kind, "inputs": inputs, "eval": {"window": size}}
    return export_model(
        model,
        meta,
        Path(str(cfg.out)),
        cfg.size,
        cfg.batch,
        cfg.steps,
        cfg.onnx,
        cfg.atol,
        cfg.rtol,
        cfg.seed,
    )


def _as_batch(kind, names, args) -> dict:
    if kind == "change":
        b: dict = {"t1": {}, "t2": {}}
        for n, a in zip(names, args):
            d, k = n.split(".", 1)
            b[d][k] = a
        return b
    return dict(zip(names, args))

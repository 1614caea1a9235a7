"""`skysense export checkpoint=MODEL [out=DIR]`: an encoder with its task head as a
``torch.export`` program (and ONNX where the exporter takes it), checked against eager. See
:mod:`skysense.tasks.downstream.export`."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf


def main(cfg, command: str = "export") -> int:
    from skysense.tasks.downstream.errors import as_config_errors

    with as_config_errors("export"):
        report = _export(cfg)
    print(json.dumps(report, indent=1))
    return 0


def _export(cfg) -> dict:
    import torch

    from skysense.tasks.downstream.checkpoint import (
        FORMAT,
        build_encoder,
        load_finetuned,
        torch_load,
    )
    from skysense.tasks.downstream.data import _sensor_inputs
    from skysense.tasks.downstream.export import example_inputs, export_model, input_names
    from skysense.tasks.downstream.model import build_task_model
    from skysense.tasks.errors import ConfigError

    ckpt = cfg.checkpoint
    if ckpt and torch_load(ckpt).get("format") == FORMAT:
        model, meta = load_finetuned(ckpt)
    else:
        h = cfg.head
        from skysense.tasks.downstream.datasets.manifest import SPEC_SENSORS

        sensors = {**SPEC_SENSORS, **OmegaConf.to_container(h.sensors, resolve=True)}
        bad = [m for m in h.modalities if m not in SPEC_SENSORS]
        if not h.modalities or bad:
            raise ConfigError(
                "head.modalities", f"a non-empty subset of [hr, s2, s1], got {list(h.modalities)}"
            )
        mods = [m for m in ("hr", "s2", "s1") if m in h.modalities]
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

"""`skysense convert SRC... DST`: released SkySense ``.pth`` files -> a weights folder.

The sources are the release's files (research licence; users bring them): the three backbone
files, the grid heads and the fusion as separate files, or one combined file. A file whose
keys carry no module prefix (a per-module file: ``patch_embed.projection.weight``, ...) takes
it from its name (``..._backbone_hr.pth`` -> ``backbone_hr.``, likewise ``backbone_gep``,
``backbone_s2``, ``backbone_s1``, ``head_s2``, ``head_s1``, ``fusion``). Files are read with
``torch.load(weights_only=True)`` only.

The keys are mapped onto the encoder preset (``model=huge`` by default, built on the meta
device, so nothing of the model is allocated) by
:func:`skysense.encoders.checkpoint_filter.match_to_model`. Strict by default: a module the
sources touch must be complete and every source key must find its place, else the command
fails listing the keys; ``strict=false`` prints the table and writes what fits. Modules the
sources hold nothing of (the fusion, when only the backbones are given) are listed in
``config.json`` and keep their initialisation when loaded.

DST gets ``model.safetensors`` (this project's names), ``config.json`` (preset, the complete
encoder config, parts, sensors with band order and normalisation statistics, source file
names with their sha256) and ``SHA256SUMS``; see :mod:`skysense.encoders.weights`.

The encoder config records the release's structure (``release.*``:
:class:`skysense.tasks.conf.commands.ReleaseStructure`), ``swin_window_mode: release``
included: a model built from the folder treats Swin windows that do not tile a stage map as
the release's mmpretrain code does (zero padding attended to, no shift once a side equals the
window), so it gives the release's outputs at every input size; ``release.swin_window_mode=masked`` records this project's default instead.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

RELEASE_PREFIXES = (
    "backbone_gep",
    "backbone_hr",
    "backbone_s2",
    "backbone_s1",
    "head_s2",
    "head_s1",
    "fusion",
)
_TOP = (*RELEASE_PREFIXES, "ctpe", "hr_encoder", "s2_encoder", "s1_encoder", "grid_s2", "grid_s1")
_FROM_NAME = re.compile(
    r"(backbone_gep|backbone_hr|backbone_s2|backbone_s1|head_s2|head_s1|fusion)"
)
# The sensors the encoder's modalities read, in the spec's band order.
SENSORS = {"hr": "hr_rgb", "s2": "s2_l2a", "s1": "s1_grd_db"}


def main(cfg, command: str = "convert") -> int:
    from skysense.tasks.downstream.errors import as_config_errors

    with as_config_errors("convert"):
        report = convert(cfg)
    print(json.dumps(report, indent=1))
    return 0


def _sources(cfg) -> list[Path]:
    from skysense.tasks.errors import ConfigError

    src = cfg.src
    if src is None or src == "???":
        raise ConfigError("src", "give the released .pth file(s): skysense convert SRC... DST")
    items = [src] if isinstance(src, str) else list(src)
    if not items:
        raise ConfigError("src", "give the released .pth file(s): skysense convert SRC... DST")
    paths = [Path(str(s)).expanduser() for s in items]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"src {p} does not exist")
    return paths


def read_release(path: Path) -> dict:
    """One released file -> its state dict under the release's top-level names."""
    from skysense.encoders.checkpoint_filter import unwrap_state_dict
    from skysense.encoders.weights import read_state_dict

    state, _ = read_state_dict(path)
    state = unwrap_state_dict(state)
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    if any(k.split(".", 1)[0] in _TOP for k in state):
        return state
    m = _FROM_NAME.search(path.name)
    if m is None:
        raise ValueError(
            f"{path}: its keys ({next(iter(state))}, ...) carry no module prefix and its name "
            f"does not say which module it holds (one of {', '.join(RELEASE_PREFIXES)})"
        )
    return {f"{m.group(1)}.{k}": v for k, v in state.items()}


def _release_fields(cfg, merged: dict) -> dict:
    """The release's structure as encoder config fields (``release.*``; ``auto`` from keys)."""
    r = OmegaConf.to_container(cfg.release, resolve=True)
    fields = {}
    for k, v in r.items():
        if v == "auto" and k == "vit_final_norm":
            vit = [k2 for k2 in merged if k2.startswith(("backbone_s2.", "backbone_s1."))]
            if vit:  # mmseg's final_norm stores ln1 at the top of the ViT
                v = any(re.match(r"backbone_s[12]\.ln1\.", k2) for k2 in vit)
            else:
                continue
        fields[k] = v
    return fields


def convert(cfg) -> dict:
    """Read, map, check and write; returns the summary printed by the command."""
    import torch

    from skysense.encoders import build_skysense
    from skysense.encoders.checkpoint_filter import match_to_model
    from skysense.encoders.weights import save_weights, sha256_file

    paths = _sources(cfg)
    if cfg.dst is None or str(cfg.dst) in ("", "???"):
        from skysense.tasks.errors import ConfigError

        raise ConfigError("dst", "give the output folder: skysense convert SRC... DST")
    dst = Path(str(cfg.dst)).expanduser()
    merged: dict = {}
    owner: dict[str, Path] = {}
    for p in paths:
        for k, v in read_release(p).items():
            if k in merged:
                raise ValueError(f"{k} is in both {owner[k]} and {p}")
            merged[k], owner[k] = v, p

    overrides = {
        **_release_fields(cfg, merged),
        **OmegaConf.to_container(cfg.model.overrides, resolve=True),
    }
    with torch.device("meta"):
        model = build_skysense(cfg.model.preset, **overrides)
    mapped, report = match_to_model(merged, model)
    strict = bool(cfg.strict)
    if not report.ok:
        if strict:
            raise ValueError(report.error(", ".join(str(p) for p in paths)))
        print(report.table())
    own = model.state_dict()
    state = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    present = sorted({k.split(".", 1)[0] for k in state})
    config = {
        "preset": cfg.model.preset,
        "model": _jsonable(asdict(model.cfg)),
        "parts": present,
        "absent": report.absent,
        "sensors": sensor_specs(model.cfg.modalities),
        "sources": [
            {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths
        ],
        "converted": {
            "by": "skysense convert",
            "strict": strict,
            "missing": report.missing,
            "unexpected": report.unexpected,
            "shape": report.shape,
            "dropped": report.dropped,
        },
    }
    save_weights(dst, state, config)
    log.info("wrote %s (%d tensors)", dst, len(state))
    return {
        "dst": str(dst),
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values())),
        "parts": present,
        "absent": report.absent,
        "ok": report.ok,
    }


def sensor_specs(modalities) -> dict:
    """{modality: sensor name, band order, normalisation mean and std} of this project's spec
    sensors (the statistics the data package normalises with)."""
    from skysense.data.sensors import get_sensor

    out = {}
    for m in modalities:
        s = get_sensor(SENSORS[m])
        out[m] = {
            "sensor": s.name,
            "bands": list(s.model_bands),
            "mean": list(s.mean),
            "std": list(s.std),
        }
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x

"""`skysense infer SRC DST checkpoint=MODEL [src2=...] [window=...]`: run a fine-tuned model over
a scene of any size into a Cloud-Optimized GeoTIFF with the input's CRS, transform and nodata,
window by window with bounded memory. See :mod:`skysense.tasks.downstream.infer`."""

from __future__ import annotations

import json

from omegaconf import OmegaConf


def main(cfg, command: str = "infer") -> int:
    from skysense.tasks.downstream.errors import as_config_errors
    from skysense.tasks.downstream.infer import run_inference
    from skysense.tasks.training.runtime import set_threads

    set_threads(cfg.get("threads"))
    with as_config_errors("infer"):
        report = _run(cfg, run_inference)
    print(json.dumps(report))
    return 0


def _run(cfg, run_inference):
    from skysense.tasks.training.runtime import resolve_device

    return run_inference(
        cfg.checkpoint,
        cfg.src,
        cfg.dst,
        src2=cfg.get("src2"),
        extra=OmegaConf.to_container(cfg.extra, resolve=True) if cfg.get("extra") else None,
        window=cfg.get("window"),
        overlap=cfg.get("overlap"),
        batch_size=cfg.batch_size,
        block=cfg.block,
        output=cfg.output,
        device=resolve_device(cfg.device, "device"),
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        check_sensor=cfg.check_sensor,
    )

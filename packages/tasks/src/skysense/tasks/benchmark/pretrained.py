"""The pre-trained row of a suite that names one (``suite.pretrained``), for when no
``checkpoints`` are given: the tiny model that ``make pretrain`` trains on the embedded sample.

``skysense pretrain resume=true`` runs in ``suite.pretrained.run_dir`` first, so a clean clone
pre-trains it (150 steps, about 5 minutes on a 2-core CPU) and a second benchmark (or one after
``make pretrain``, which writes the same run folder) finds the run finished and only reports it;
nothing saved is ever overwritten. The newest checkpoint of that run then joins the table as
``suite.pretrained.name``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)


def pretrained_checkpoints(cfg: DictConfig) -> dict[str, str]:
    """``{name: checkpoint path}`` of ``cfg.suite.pretrained`` (pre-training it when its run
    folder holds no finished run), or ``{}`` when checkpoints are given or the suite names none.

    Raises:
        ConfigError: the pre-training fails (its exit status and run folder named)."""
    spec = cfg.suite.get("pretrained")
    if cfg.get("checkpoints") or not spec:
        return {}
    from skysense.tasks import cli
    from skysense.tasks.pretrain import main as pretrain
    from skysense.tasks.training.checkpoint import checkpoints

    run_dir = Path(str(spec.run_dir))
    overrides = [f"run_dir={run_dir}", "resume=true", f"model={cfg.model.preset}"]
    overrides += [str(o) for o in spec.get("overrides") or []]
    log.info("suite %s: the pre-trained row from skysense pretrain %s", cfg.suite.name, overrides)
    rc = pretrain(cli.compose("pretrain", overrides))
    found = checkpoints(run_dir / "checkpoints")
    if rc != 0 or not found:
        raise ConfigError(
            "suite.pretrained",
            f"skysense pretrain {' '.join(overrides)} ended with status {rc} and left no "
            f"checkpoint in {run_dir / 'checkpoints'}",
        )
    return {str(spec.name): str(found[0])}

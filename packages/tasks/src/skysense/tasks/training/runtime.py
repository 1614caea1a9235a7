"""Where and how a run computes: the device, the random seed, the CPU threads.

One definition each for every command (pretrain, finetune, evaluate, infer, benchmark), so that
``device=auto`` means the same everywhere and a wrong device is the same one-line error.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str, field: str = "trainer.device") -> torch.device:
    """The device that ``name`` asks for: ``auto`` is CUDA when available, else the CPU;
    otherwise ``cpu``, ``cuda`` or ``cuda:N``.

    Raises ConfigError naming ``field`` (the config key that held ``name``) for a string that
    is not a device, a device type other than cpu/cuda, or CUDA on a machine without it.
    """
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(field, f"'{name}' is not a device ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(field, f"'{name}': only auto, cpu and cuda[:N] are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(field, f"'{name}' asked for, but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's (CPU and every GPU) random streams."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (third-party code may draw from the global state)
    torch.manual_seed(seed)


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is set (None or 0: torch's default, one per
    core). On a machine whose cores other jobs share, 1 is often several times faster: idle
    OpenMP threads spin while they wait for a descheduled sibling."""
    if n:
        torch.set_num_threads(int(n))
        log.info("torch CPU threads: %d", int(n))

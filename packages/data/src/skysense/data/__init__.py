"""skysense.data: from GeoTIFFs of three sensors to aligned, masked, augmented batches.

Public entry points (imported lazily, so ``import skysense.data`` stays light):

- :func:`build_loader` (``skysense.data.loader``): manifest -> iterable of batch dicts;
  :func:`resolve_manifest`: the manifest a ``conf/data/*.yaml`` config points at.
- ``skysense.data.ingest.ingest``: GeoTIFF folder -> shards + SQLite manifest.
- :func:`ensure_embedded` (``skysense.data.embedded``): the embedded sample data set.
- :func:`plot_sample` (``skysense.data.plot``): a PNG of what the model gets.
- :func:`validate_batch` (``skysense.data.batch``): check a batch against the contract.
- ``skysense.data.io`` (reading GeoTIFFs), ``skysense.data.sensors`` (the sensor registry).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_loader": "skysense.data.loader",
    "resolve_manifest": "skysense.data.loader",
    "ViewConfig": "skysense.data.views",
    "IngestConfig": "skysense.data.ingest",
    "Manifest": "skysense.data.manifest",
    "ensure_embedded": "skysense.data.embedded",
    "plot_sample": "skysense.data.plot",
    "validate_batch": "skysense.data.batch",
    "SENSORS": "skysense.data.sensors",
    "SensorSpec": "skysense.data.sensors",
    "register_sensor": "skysense.data.sensors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skysense.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

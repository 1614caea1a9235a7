"""Primary configs that are dataclasses, not YAML files: ``skysense ingest`` and ``skysense
infer``. Their fields, types and defaults are written once, here or in the runtime config they
extend (:class:`skysense.data.ingest.IngestConfig`); ``skysense <command> --help`` prints the
docstrings below as the meaning of each key. Imported by :func:`schema.register` only (it reads
the data package, which the Hydra-less GPU check script does not install).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from skysense.data.ingest import IngestConfig
from skysense.tasks.conf.schema import InferConfig


@dataclass
class IngestCommandConfig(IngestConfig):
    """``skysense ingest SRC DST``: GeoTIFFs (any CRS, per-band files or stacks) -> shards +
    SQLite manifest. Every field of :class:`skysense.data.ingest.IngestConfig` (above), and:

    src: the source folder, file, STAC catalogue / ItemCollection JSON or STAC GeoParquet.
    dst: the ingest folder (manifest.sqlite, shards/, plots/).
    plots: preview PNGs of the first samples written to DST/plots (0: none).
    """

    src: str = MISSING
    dst: str = MISSING
    plots: int = 2


PRIMARY: dict[str, type] = {"ingest": IngestCommandConfig, "infer": InferConfig}

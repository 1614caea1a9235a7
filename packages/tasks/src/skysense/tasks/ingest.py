"""`skysense ingest SRC DST [key=value ...]`: GeoTIFFs -> shards + SQLite manifest.

Composes ``conf/ingest.yaml`` (every field of :class:`skysense.data.ingest.IngestConfig`, plus
``plots``), runs :func:`skysense.data.ingest.ingest`, prints the per-file report and writes a
preview PNG of the first samples (``DST/plots/sample_<id>.png``) so a person can look at what
the model will get. Returns 0 when every file was good, 1 when some were bad (the good ones are
ingested all the same), 2 for a config error.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)


def _ingest_config(d: dict):
    from skysense.data.ingest import IngestConfig

    fields = {f.name for f in dataclasses.fields(IngestConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(
            unknown[0], f"not a field of the ingest config (fields: {sorted(fields)})"
        )
    try:
        return IngestConfig(**d)
    except (TypeError, ValueError) as e:
        raise ConfigError("ingest", str(e)) from None


def plot_previews(dst: Path, n: int) -> list[Path]:
    """PNGs of the first ``n`` samples of the manifest in ``dst`` (whole tiles, torch loader)."""
    from skysense.data.loader import build_loader
    from skysense.data.plot import plot_sample

    if n <= 0:
        return []
    loader = build_loader(dst, split=None, batch_size=n, backend="torch", shuffle=False)
    batch = next(iter(loader))
    out = []
    names = dict(loader.assembler.manifest.query("SELECT id, name FROM samples WHERE id < ?", (n,)))
    for i in range(len(batch["sample_id"])):
        sid = int(batch["sample_id"][i])
        lat, lon = (float(v) for v in batch["latlon"][i])
        title = f"{names.get(sid, sid)}  ({lat:.4f} N, {lon:.4f} E)"
        out.append(plot_sample(batch, dst / "plots" / f"sample_{sid}.png", index=i, title=title))
    return out


def main(cfg, command: str = "ingest") -> int:
    from omegaconf import OmegaConf

    from skysense.data.ingest import ingest
    from skysense.data.io import BadInputError

    d = OmegaConf.to_container(cfg, resolve=True)
    src, dst = Path(str(d.pop("src"))), Path(str(d.pop("dst")))
    plots = int(d.pop("plots", 0) or 0)
    if not src.exists():
        raise ConfigError("src", f"{src} does not exist")
    icfg = _ingest_config(d)
    try:
        report = ingest(src, dst, icfg)
    except BadInputError as e:
        print(f"skysense {command}: {e}")
        return 1
    except ValueError as e:  # settings that disagree with dst's ingest, unfit sensors
        raise ConfigError("ingest", str(e)) from None
    print(report.format())
    if report.n_samples:
        for p in plot_previews(dst, plots):
            print(f"preview: {p}")
    return 0 if report.ok else 1

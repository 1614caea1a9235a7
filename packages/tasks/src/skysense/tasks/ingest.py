"""`skysense ingest SRC DST [key=value ...]`: GeoTIFFs -> shards + SQLite manifest.

Composes the ``ingest`` config (:class:`skysense.tasks.conf.commands.IngestCommandConfig`:
every field of :class:`skysense.data.ingest.IngestConfig`, plus ``src``, ``dst`` and ``plots``;
typed at composition), checks each value's type again (one line naming the field, before
anything is created), runs :func:`skysense.data.ingest.ingest`, prints the report with the bad
files (path and reason, each once) and writes a preview PNG of the first samples
(``DST/plots/sample_<id>.png``) so a person can look at what the model will get.

Exit codes: 0 every file was good; 1 some were bad (the good ones are ingested all the same);
2 a config error, a DST that holds another ingest (another SRC or other settings: ``mode=append``
or ``overwrite=true``), or no usable file at all (the bad files are printed first). Environment
faults (an unwritable DST, a full disk, another ingest holding DST's lock) are ``OSError``\\ s
naming the path, which the command line reports in one line (exit 1).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, annotation: str, value) -> None:
    """Raise ConfigError when ``value`` does not fit the field's annotation (a string such as
    ``"int | None"`` or ``"dict[str, str] | None"``)."""
    parts = [p.strip() for p in annotation.split("|")]
    if value is None:
        if "None" in parts:
            return
        raise ConfigError(name, "must be set (it has no null value)")
    base = parts[0].split("[")[0]
    ok = _TYPES.get(base)
    if ok is None:
        return
    if isinstance(value, bool) and base != "bool":
        good = False
    else:
        good = isinstance(value, ok)
    if not good:
        what = _NAMES.get(base, f"a {base}")
        raise ConfigError(name, f"expected {what}, got {value!r}")


def _ingest_config(d: dict):
    from skysense.data.ingest import IngestConfig

    fields = {f.name: f for f in dataclasses.fields(IngestConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            unknown[0], f"not a field of the ingest config (fields: {sorted(fields)})"
        )
    for k, v in d.items():
        _check_type(k, str(fields[k].type), v)
    try:
        return IngestConfig(**d)
    except (TypeError, ValueError) as e:
        msg = str(e)
        first = msg.split(" ", 1)[0]
        raise ConfigError(first if first in fields else "ingest", msg) from None


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

    from skysense.data.ingest import IngestConflictError, ingest
    from skysense.data.io import BadInputError

    d = OmegaConf.to_container(cfg, resolve=True)
    src, dst = Path(str(d.pop("src"))), Path(str(d.pop("dst")))
    plots = d.pop("plots", 0)
    _check_type("plots", "int | None", plots)
    plots = int(plots or 0)
    if not src.exists():
        raise ConfigError("src", f"{src} does not exist")
    icfg = _ingest_config(d)
    try:
        report = ingest(src, dst, icfg)
    except IngestConflictError as e:
        raise ConfigError(e.field, str(e)) from None
    except BadInputError as e:
        rep = getattr(e, "report", None)
        if rep is not None and rep.bad_files:
            print(rep.format_bad_files())
        raise
    print(report.format())
    if report.n_samples:
        for p in plot_previews(dst, plots):
            print(f"preview: {p}")
    return 0 if report.ok else 1

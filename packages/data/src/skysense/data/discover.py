"""Finding samples in a folder of GeoTIFFs: which file is which sensor, band, date and place.

Every raster under the source folder is opened once (header and last row) and classified:

- **sensor**: a user rule (``sensors: {regex: name}`` on the relative path) wins; else band
  tokens in the name (``B02``.. ``B12``, ``B8A`` -> Sentinel-2; ``VV``/``VH`` -> Sentinel-1),
  band descriptions of a stack, then band count and dtype (3-4 bands of uint8 -> HR RGB;
  10/12/13 bands of uint16 -> Sentinel-2; 2 bands of float -> Sentinel-1). Name tokens such as
  ``MSIL1C``/``L2A`` or ``linear``/``db`` pick the product level.
- **cloud masks**: files whose name has a token ``CLM``, ``CLOUD``, ``CLOUDMASK`` (non-zero =
  cloud), ``SCL`` (Sentinel-2 scene classification) or ``CLD`` (cloud probability, %): they
  attach to the Sentinel-2 acquisition of the same place and date.
- **date**: :func:`skysense.data.io.read_date` (user pattern, tags, sidecars, file name).
- **place** (group): a user ``group_pattern`` (regex with a named group ``group`` on the
  relative path), else the file's folder with acquisition-like folder names (``imgs_1``,
  ``20170613``, ``s2``) dropped; a BigEarthNet S1 patch joins the S2 patch its metadata names.
  Within a place, files whose footprints do not overlap are split into separate places (a
  folder of aerial tiles), and a sensor whose files overlap none of the place's reference
  sensor (S2, else S1, else HR) is reported: "no overlap between sensors".

Files that cannot be used are reported, each with its reason; the others go on.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio

from skysense.data.dates import DateError
from skysense.data.geo import WGS84, area, bounds_in, intersect
from skysense.data.io import (
    BadInputError,
    band_of_file,
    check_dtype,
    is_raster,
    open_raster,
    read_date,
    stack_band_names,
)
from skysense.data.sensors import SENSORS, get_sensor

log = logging.getLogger(__name__)

MODALITY_ORDER = ("s2", "s1", "hr")  # reference sensor of a place: the first present
_ACQ_FOLDER = re.compile(
    r"^(imgs?_?\d+|\d{8}(t\d{6})?|\d{4}-\d{2}-\d{2}|s1|s2|hr|sentinel-?[12]|date_?\d+)$", re.I
)
_MASK_TOKENS = {
    "CLM": "binary",
    "CLOUD": "binary",
    "CLOUDMASK": "binary",
    "SCL": "scl",
    "CLD": "prob",
}
_HINTS = {
    "s2": {"S2", "S2A", "S2B", "S2C", "MSI", "MSIL1C", "MSIL2A", "L1C", "L2A", "SENTINEL2"},
    "s1": {"S1", "S1A", "S1B", "S1C", "GRD", "GRDH", "IW", "SENTINEL1", "SAR"},
    "hr": {"HR", "RGB", "AERIAL", "ORTHO", "NAIP", "VHR"},
}


@dataclass
class FileInfo:
    """What discovery learnt about one raster file."""

    path: Path
    rel: str
    kind: str  # "band" (one band of a per-band set), "stack", or "mask"
    modality: str | None
    sensor: str | None  # None for per-band S2 files until the product level is known
    band: str | None = None
    stack_bands: list[str] = field(default_factory=list)
    mask_kind: str | None = None
    date: dt.date | None = None
    crs: object = None
    bounds: tuple = ()
    wgs84: tuple = ()
    res: tuple = ()
    key: str = ""
    hints: set = field(default_factory=set)
    unit: str = ""  # band files sharing it (and date) form one acquisition; "": their folder


@dataclass
class Acquisition:
    """One acquisition of one sensor at one place: per-band files or one stack, plus masks."""

    modality: str
    sensor: str
    date: dt.date | None
    bands: dict[str, Path] = field(default_factory=dict)  # per-band files
    stack: Path | None = None
    stack_bands: list[str] = field(default_factory=list)
    masks: list[tuple[Path, str]] = field(default_factory=list)  # (file, mask kind)

    @property
    def files(self) -> list[Path]:
        return ([self.stack] if self.stack else list(self.bands.values())) + [
            m for m, _ in self.masks
        ]

    @classmethod
    def from_description(cls, modality: str, date, d: dict) -> Acquisition:
        """The inverse of :meth:`describe` (the manifest's ``acquisitions.files``)."""
        if "stack" in d:
            acq = cls(modality, d["sensor"], date, stack=Path(d["stack"]), stack_bands=d["bands"])
        else:
            acq = cls(
                modality, d["sensor"], date, bands={b: Path(p) for b, p in d["bands"].items()}
            )
        acq.masks = [(Path(p), k) for p, k in d.get("masks", [])]
        return acq

    def describe(self) -> dict:
        d = {"sensor": self.sensor}
        if self.stack is not None:
            d["stack"] = str(self.stack)
            d["bands"] = self.stack_bands
        else:
            d["bands"] = {b: str(p) for b, p in self.bands.items()}
        if self.masks:
            d["masks"] = [[str(p), k] for p, k in self.masks]
        return d


@dataclass
class Group:
    """One place: its acquisitions per modality (sorted by date), label and source key."""

    name: str
    key: str
    acquisitions: dict[str, list[Acquisition]]
    labels: list[str] | None = None

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITY_ORDER if self.acquisitions.get(m)]

    @property
    def files(self) -> list[Path]:
        return [f for acqs in self.acquisitions.values() for a in acqs for f in a.files]


@functools.lru_cache(maxsize=4096)
def _wgs84_bounds(crs_wkt: str, bounds: tuple) -> tuple:
    # Files of one place share CRS and bounds: transform each footprint once.
    return bounds_in(bounds, crs_wkt, WGS84)


def _tokens(text: str) -> list[str]:
    return [t.upper() for t in re.split(r"[^A-Za-z0-9]+", text) if t]


def _classify(ds, path: Path, rel: str, cfg) -> FileInfo:
    """Sensor, band and kind of one open file; raises BadInputError when it fits no sensor."""
    name_tokens = _tokens(path.stem)
    hints = set()
    for m, words in _HINTS.items():
        if words & set(_tokens(rel)):
            hints.add(m)
    info = FileInfo(path=path, rel=rel, kind="stack", modality=None, sensor=None, hints=hints)
    for pattern, sensor in (cfg.sensors or {}).items():
        if re.search(pattern, rel):
            spec = get_sensor(sensor)
            info.sensor, info.modality = spec.name, spec.modality
            band = band_of_file(path, spec) if ds.count == 1 else None
            if band is not None and len(spec.bands) > 1:
                info.kind, info.band = "band", band
            break
    if info.sensor is None:
        for tok in reversed(name_tokens):
            if tok in _MASK_TOKENS and ds.count == 1:
                info.kind, info.mask_kind, info.modality = "mask", _MASK_TOKENS[tok], "s2"
                return info
        if ds.count == 1:
            if band_of_file(path, "s2_l1c") is not None:
                info.kind, info.modality = "band", "s2"
                info.band = band_of_file(path, "s2_l1c")
                info.sensor = _s2_level(rel, None)
            elif band_of_file(path, "s1_grd_db") is not None:
                info.kind, info.modality = "band", "s1"
                info.band = band_of_file(path, "s1_grd_db")
                info.sensor = _s1_kind(rel, cfg)
        if info.kind == "stack":
            info.sensor = _stack_sensor(ds, rel, hints, cfg)
            info.modality = SENSORS[info.sensor].modality if info.sensor else None
    if info.modality is None:
        raise BadInputError(
            path,
            f"cannot tell which sensor this is ({ds.count} band(s) of {ds.dtypes[0]}, no band "
            "name in the file name or band descriptions); set `sensors: {<regex>: <sensor>}`",
        )
    # A per-band Sentinel-2 file whose level is not in its name is checked as L2A (same dtypes);
    # its acquisition decides the level (B10 present -> L1C).
    spec = get_sensor(info.sensor or cfg.s2_default)
    check_dtype(ds, spec)
    if info.kind == "stack":
        info.stack_bands = stack_band_names(ds, spec)
    return info


def _s2_level(rel: str, bands) -> str | None:
    up = rel.upper()
    if "L1C" in up:
        return "s2_l1c"
    if "L2A" in up:
        return "s2_l2a"
    return None  # decided per acquisition (B10 present -> L1C)


def _s1_kind(rel: str, cfg) -> str:
    toks = set(_tokens(rel))
    if "LINEAR" in toks or "LIN" in toks:
        return "s1_grd_linear"
    if "DB" in toks:
        return "s1_grd_db"
    return cfg.s1_default


def _stack_sensor(ds, rel: str, hints: set, cfg) -> str | None:
    descs = [d for d in (ds.descriptions or []) if d]
    if descs and len(descs) == ds.count:
        for name in _candidates(hints, cfg):
            spec = SENSORS[name]
            if all(spec.canonical_band(d) for d in descs):
                return name
    dtype = np.dtype(ds.dtypes[0])
    n = ds.count
    if hints and len(hints) == 1:
        # The path says which sensor; band count and dtype are then checked against it.
        m = next(iter(hints))
        if m == "s2":
            lvl = _s2_level(rel, None)
            return lvl or ("s2_l1c" if n == 13 else cfg.s2_default)
        return cfg.s1_default if m == "s1" else "hr_rgb"
    if dtype == np.uint8 and n in (3, 4):
        return "hr_rgb"
    if np.issubdtype(dtype, np.integer) and n in (10, 12, 13):
        return _s2_level(rel, None) or ("s2_l1c" if n == 13 else cfg.s2_default)
    if np.issubdtype(dtype, np.floating) and n == 2:
        return _s1_kind(rel, cfg)
    return None


def _candidates(hints: set, cfg) -> list[str]:
    names = [cfg.s2_default, "s2_l1c", "s2_l2a", cfg.s1_default, "hr_rgb"]
    names += [n for n in SENSORS if n not in names]
    if hints:
        names = [n for n in names if SENSORS[n].modality in hints] + [
            n for n in names if SENSORS[n].modality not in hints
        ]
    return list(dict.fromkeys(names))


def _group_key(path: Path, src: Path, cfg) -> str:
    rel = path.relative_to(src)
    if cfg.group_pattern:
        m = re.search(cfg.group_pattern, rel.as_posix())
        if m is None or "group" not in m.groupdict():
            raise BadInputError(
                path, f"group_pattern {cfg.group_pattern!r} does not match (named group 'group')"
            )
        return m.group("group")
    # BigEarthNet: an S1 patch names the S2 patch it pairs with.
    for meta in path.parent.glob("*_labels_metadata.json"):
        try:
            d = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if d.get("corresponding_s2_patch"):
            return d["corresponding_s2_patch"]
    parts = [p for p in rel.parent.parts if not _ACQ_FOLDER.match(p)]
    return parts[-1] if parts else src.name


def _labels_of(folder: Path) -> list[str] | None:
    for meta in folder.glob("*_labels_metadata.json"):
        try:
            d = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d.get("labels"), list):
            return [str(x) for x in d["labels"]]
    return None


def _probe_env(path: Path, root: Path, cfg):
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        return _probe(path, root, cfg)


def _probe(path: Path, root: Path, cfg) -> tuple[FileInfo | None, str]:
    """(FileInfo, "") of one file, or (None, reason) when it cannot be used."""
    p = path
    rel = p.relative_to(root).as_posix()
    try:
        # Pixels are read (and truncation found) when the place is aligned; here the header
        # is enough, which halves the cost of a folder of many small files.
        ds = open_raster(p, check_pixels=False)
    except BadInputError as e:
        return None, e.reason
    try:
        with ds:
            info = _classify(ds, p, rel, cfg)
            info.crs = ds.crs
            info.bounds = tuple(ds.bounds)
            info.res = ds.res
            info.wgs84 = _wgs84_bounds(ds.crs.to_wkt(), info.bounds)
            try:
                info.date = read_date(p, cfg.date_pattern, tags=ds.tags())
            except DateError as e:
                raise BadInputError(p, f"unparseable date: {e}") from None
            # No date found: kept as a single acquisition of unknown date (most classification
            # datasets have none); a series with an undated step is refused in _acquisitions.
            info.key = _group_key(p, root, cfg)
    except BadInputError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
        return None, f"unreadable: {type(e).__name__}: {e}"
    return info, ""


def _raster_files(src: Path) -> list[Path]:
    """The raster files below ``src``, sorted, following folder links (a place linked into the
    source is read; ``Path.rglob`` skips linked folders before Python 3.13), each real folder
    once (a link loop is not followed twice)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        d = Path(dirpath)
        out += [d / f for f in filenames if is_raster(d / f) and (d / f).is_file()]
    return sorted(out)


def discover(src, cfg, bad: list) -> list[Group]:
    """The places (groups) under ``src``, in a deterministic order.

    ``src``: a folder, one raster file, or a STAC file (:mod:`skysense.data.stac`).

    ``bad`` collects ``(path, reason)`` for every file that cannot be used.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source folder not found")
    from skysense.data.stac import discover_stac, is_stac

    if is_stac(src):  # a STAC catalogue, ItemCollection or GeoParquet file
        return discover_stac(src, cfg, bad)
    paths = _raster_files(src) if src.is_dir() else [src]
    root = src if src.is_dir() else src.parent
    infos: list[FileInfo] = []
    labels_by_key: dict[str, list[str]] = {}
    if cfg.workers and cfg.workers > 0 and len(paths) > 64:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cfg.workers) as ex:
            probed = list(
                ex.map(_probe_env, paths, [root] * len(paths), [cfg] * len(paths), chunksize=64)
            )
    else:
        probed = [_probe(p, root, cfg) for p in paths]
    for p, (info, reason) in zip(paths, probed):
        if info is None:
            bad.append((str(p), reason))
            continue
        lab = _labels_of(p.parent)
        if lab is not None and info.key not in labels_by_key:
            labels_by_key[info.key] = lab
        infos.append(info)

    by_key: dict[str, list[FileInfo]] = defaultdict(list)
    for info in infos:
        by_key[info.key].append(info)
    groups: list[Group] = []
    for key in sorted(by_key):
        for g in _split_places(key, by_key[key], bad, cfg):
            g.labels = labels_by_key.get(key)
            groups.append(g)
    return groups


def _split_places(key: str, infos: list[FileInfo], bad: list, cfg) -> list[Group]:
    """Cluster a key's files by footprint overlap, then build each place's acquisitions."""
    n = len(infos)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            inter = intersect(infos[i].wgs84, infos[j].wgs84)
            if inter is None:
                continue
            small = min(area(infos[i].wgs84), area(infos[j].wgs84))
            if area(inter) > 0.01 * small:
                parent[find(i)] = find(j)
    clusters: dict[int, list[FileInfo]] = defaultdict(list)
    for i in range(n):
        clusters[find(i)].append(infos[i])
    cl = sorted(clusters.values(), key=lambda c: min(f.rel for f in c))
    mods_of = [{f.modality for f in c if f.kind != "mask"} for c in cl]
    ref = next((m for m in MODALITY_ORDER if any(m in s for s in mods_of)), None)
    out = []
    n_kept = sum(1 for mods in mods_of if ref in mods)
    for c, mods in zip(cl, mods_of):
        if ref is not None and ref not in mods:
            ref_files = sorted(f.rel for cc in cl for f in cc if f.modality == ref)[:3]
            for f in c:
                bad.append(
                    (
                        str(f.path),
                        f"no overlap between sensors: this {f.modality} file does not overlap "
                        f"the {ref} files of place {key!r} ({', '.join(ref_files)}...)",
                    )
                )
            continue
        name = key if n_kept == 1 else f"{key}/{min(f.path.stem for f in c)}"
        acqs = _acquisitions(c, bad, cfg)
        if any(acqs.values()):
            out.append(Group(name=name, key=key, acquisitions=acqs))
    return out


def _acquisitions(files: list[FileInfo], bad: list, cfg) -> dict[str, list[Acquisition]]:
    per_band: dict[tuple, list[FileInfo]] = defaultdict(list)
    acqs: dict[str, list[Acquisition]] = defaultdict(list)
    masks = [f for f in files if f.kind == "mask"]
    for f in files:
        if f.kind == "band":
            per_band[(f.modality, f.date, f.unit or str(f.path.parent))].append(f)
        elif f.kind == "stack":
            acqs[f.modality].append(
                Acquisition(f.modality, f.sensor, f.date, stack=f.path, stack_bands=f.stack_bands)
            )
    for (modality, date, _), fs in sorted(per_band.items(), key=lambda kv: str(kv[0])):
        bands = {}
        for f in sorted(fs, key=lambda f: f.rel):
            if f.band in bands:
                bad.append((str(f.path), f"second file for band {f.band} on {date}"))
                continue
            bands[f.band] = f.path
        sensor = next((f.sensor for f in fs if f.sensor), None)
        if modality == "s2" and sensor is None:
            sensor = "s2_l1c" if "B10" in bands else cfg.s2_default
        spec = SENSORS[sensor]
        missing = [b for b in spec.model_bands if b not in bands]
        if missing and not (cfg.missing_bands == "fill" and len(missing) < len(spec.model_bands)):
            for p in bands.values():
                bad.append(
                    (
                        str(p),
                        f"band count does not match sensor {spec.name}: the {date} acquisition "
                        f"lacks band(s) {' '.join(missing)} (have {' '.join(bands)})",
                    )
                )
            continue
        acqs[modality].append(Acquisition(modality, sensor, date, bands=bands))
    for m in masks:
        target = [a for a in acqs.get("s2", []) if a.date == m.date]
        if not target:
            bad.append((str(m.path), f"cloud mask of {m.date} matches no Sentinel-2 acquisition"))
            continue
        target[0].masks.append((m.path, m.mask_kind))
    for m in list(acqs):
        undated = [a for a in acqs[m] if a.date is None]
        if undated and len(acqs[m]) > 1:
            # One image of unknown date is a valid sample; a series needs every step's date.
            for a in undated:
                for f in a.files:
                    bad.append(
                        (
                            str(f),
                            f"no date (none in the file name, its folders, tags or sidecar "
                            f"files; set `date_pattern`), in a {m} series of {len(acqs[m])} "
                            "acquisitions: a series needs every date",
                        )
                    )
            acqs[m] = [a for a in acqs[m] if a.date is not None]
        acqs[m].sort(
            key=lambda a: (a.date or dt.date.min, str(a.stack or next(iter(a.bands.values()))))
        )
    return {m: a for m, a in acqs.items() if a}

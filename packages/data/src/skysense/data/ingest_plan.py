"""Ingest, planning: the settings of one ingest, what every place shares, labels and splits.

:class:`IngestConfig` holds every setting (each is also a ``skysense ingest`` override);
:func:`make_plan` decides the modalities, the tile and the HR ratio from the discovered places;
:func:`sensor_normalisation` checks that the sensors fit the batch contract;
:func:`labels_and_splits` gives each place its labels and split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import rasterio

from skysense.data.discover import Acquisition, Group
from skysense.data.geo import bounds_in, choose_crs, is_metric_projected
from skysense.data.io import BadInputError
from skysense.data.sensors import SENSORS
from skysense.kernels.modalities import MODALITIES, MODALITY

log = logging.getLogger(__name__)

# Band order of each modality in the shards (the model's order).
MODEL_BANDS = {
    m: SENSORS[s].model_bands for m, s in (("hr", "hr_rgb"), ("s2", "s2_l2a"), ("s1", "s1_grd_db"))
}


@dataclass
class IngestConfig:
    """Settings of one ingest (every field is also a ``skysense ingest`` override).

    Attributes:
        tile_size: tile side in Sentinel pixels (paper: 64 at 10 m).
        gsd: Sentinel grid pixel size, metres.
        hr_ratio: HR pixels per Sentinel pixel (paper: 2048 / 64 = 32); None: from the first HR
            file's ground resolution, rounded.
        hr_gsd: HR-only data sets: HR pixel size in metres (None: the first HR file's).
        hr_tile_size: HR-only data sets: tile side in HR pixels.
        crs: "auto" (the reference sensor's CRS when metric, else UTM of the centre), "utm",
            or a CRS string ("EPSG:32631").
        resampling: Sentinel resampling (bilinear keeps reflectances smooth when 20/60 m bands
            go to 10 m); hr_resampling: HR resampling (average when reducing resolution).
        date_pattern: regex (named groups year/month/day or date) or strptime format for dates
            in file names; None: tags, sidecars, then YYYYMMDD / YYYY-MM-DD in names.
        group_pattern: regex with a named group ``group`` on the relative path that names the
            place a file belongs to; None: its folder (acquisition folders skipped).
        sensors: {regex on the relative path: sensor name} rules that override detection.
        s2_default, s1_default: sensor of Sentinel files whose name does not say the level.
        missing_bands: "error" (a missing model band makes the acquisition bad) or "fill"
            (single-polarisation SAR: the missing band is filled with the sensor mean, i.e. 0
            after normalisation, and logged).
        min_valid_fraction: a step is usable when at least this share of its tile is valid
            and clear.
        cloud_probability: threshold (%) for cloud-probability masks (CLD files).
        shard_size: samples per shard (a place's tiles are never split between commits).
        val_fraction, test_fraction, split_seed: split by place (a hash of its name).
        labels_file: CSV with columns group, label[, split] (default: <src>/labels.csv if any;
            labels ``a;b`` are multi-label; <src>/classes.txt orders class names).
        shard_format: "raw" (pixel-interleaved ``.npy`` read by memory map: no decoding, a crop
            reads only its window; the default) or "compressed" (HR as ``hr_codec``, Sentinel-2
            as 16-bit PNG, Sentinel-1 as byte-shuffled deflate; decoded by DALI or Pillow; see
            :mod:`skysense.data.shard_codecs`).
        hr_codec: compressed shards' HR codec: "jpeg" (lossy, ``jpeg_quality``) or "png".
        jpeg_quality: JPEG quality 1-100 of compressed shards' HR tiles.
        workers: processes that align places in parallel (0: in this process); with Dask
            installed (``skysense-data[scale]``) a LocalCluster of that many workers.
        cluster: Dask cluster of the ingest (:mod:`skysense.data.ingest_dask`): "local:N" (a
            LocalCluster of N worker processes; the default when ``workers > 0``) or the
            address of a running scheduler ("tcp://host:8786"); "pool": the local process pool
            of ``workers``, never Dask; None: see ``workers``.
        worker_memory: memory limit of each LocalCluster worker (Dask restarts a worker above
            it and re-runs its places); ``block_pixels`` keeps a place's use far below it.
        block_pixels: pixels (per band, HR pixels counted) warped at once: a block of whole
            tiles (rows and columns) of about this many pixels is read, aligned and spilled to
            disk before the next, so peak memory follows this budget (and the series length),
            never the size of the place. A block holds at least one tile.
        overwrite: start afresh even if ``dst`` holds a manifest.
        mode: "create" (``dst`` is empty or holds an ingest of the same source and settings,
            which is resumed or left as it is) or "append" (add the places of another source
            to the ingest in ``dst``; the settings must be the same).
    """

    tile_size: int = 64
    gsd: float = 10.0
    hr_ratio: int | None = None
    hr_gsd: float | None = None
    hr_tile_size: int = 256
    crs: str = "auto"
    resampling: str = "bilinear"
    hr_resampling: str = "average"
    date_pattern: str | None = None
    group_pattern: str | None = None
    sensors: dict[str, str] | None = None
    s2_default: str = "s2_l2a"
    s1_default: str = "s1_grd_db"
    missing_bands: str = "error"
    min_valid_fraction: float = 0.05
    cloud_probability: float = 50.0
    shard_size: int = 256
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    labels_file: str | None = None
    shard_format: str = "raw"
    hr_codec: str = "jpeg"
    jpeg_quality: int = 90
    workers: int = 0
    cluster: str | None = None
    worker_memory: str = "4GiB"
    block_pixels: int = 1 << 21
    overwrite: bool = False
    mode: str = "create"

    def __post_init__(self):
        if self.tile_size < 1 or self.hr_tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.gsd <= 0:
            raise ValueError(f"gsd must be positive, got {self.gsd}")
        if self.missing_bands not in ("error", "fill"):
            raise ValueError(f"missing_bands must be 'error' or 'fill', got {self.missing_bands!r}")
        if self.mode not in ("create", "append"):
            raise ValueError(f"mode must be 'create' or 'append', got {self.mode!r}")
        if self.block_pixels < 1:
            raise ValueError(f"block_pixels must be >= 1, got {self.block_pixels}")
        if self.shard_format not in ("raw", "compressed"):
            raise ValueError(
                f"shard_format must be 'raw' or 'compressed', got {self.shard_format!r}"
            )
        if self.hr_codec not in ("jpeg", "png"):
            raise ValueError(f"hr_codec must be 'jpeg' or 'png', got {self.hr_codec!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        for s in (self.s2_default, self.s1_default, *(self.sensors or {}).values()):
            if s not in SENSORS:
                raise ValueError(f"unknown sensor {s!r}; registered: {sorted(SENSORS)}")

    # Fields that change the shards' content: a resumed ingest must use the same values.
    CONTENT_FIELDS = (
        "tile_size",
        "gsd",
        "hr_ratio",
        "hr_gsd",
        "hr_tile_size",
        "crs",
        "resampling",
        "hr_resampling",
        "date_pattern",
        "group_pattern",
        "sensors",
        "s2_default",
        "s1_default",
        "missing_bands",
        "min_valid_fraction",
        "cloud_probability",
        "shard_size",
        "val_fraction",
        "test_fraction",
        "split_seed",
        "shard_format",
        "hr_codec",
        "jpeg_quality",
    )

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_FIELDS}

    def codecs(self) -> dict[str, str]:
        """{array name: codec} of the shards ({} for raw shards)."""
        if self.shard_format == "raw":
            return {}
        from skysense.data.shard_codecs import codecs_for

        return codecs_for(self.hr_codec)


@dataclass
class Plan:
    """What every place of one ingest shares."""

    modalities: tuple[str, ...]
    tile_size: int  # base grid pixels
    gsd: float  # base grid pixel size, metres
    hr_ratio: int  # HR pixels per base pixel (1 for HR-only data)
    hr_only: bool


# ----------------------------------------------------------------------------------- planning


def _hr_ground_gsd(acq: Acquisition) -> float:
    """Ground pixel size (m) of an HR file, also for geographic or Web Mercator files."""
    with rasterio.open(acq.stack or next(iter(acq.bands.values()))) as ds:
        if is_metric_projected(ds.crs):
            return float(ds.res[0])
        crs = choose_crs(ds.crs, ds.bounds, "utm")
        b = bounds_in(ds.bounds, ds.crs, crs)
        return float((b[2] - b[0]) / ds.width)


CHANNELS = {m: MODALITY[m].channels for m in MODALITIES}  # model bands per modality
STORE_DTYPES = {"hr": "uint8", "s2": "uint16", "s1": "float32"}


def sensor_normalisation(groups: list[Group]) -> dict:
    """{modality: {"sensors", "mean", "std"}}: the spec statistics the loaders normalise with.

    Every sensor feeding a modality must fit the batch contract (its channel count and the
    shards' dtype) and share one set of statistics (Sentinel-2 L1C and L2A do); raises
    ValueError naming the sensors otherwise.
    """
    used: dict[str, set[str]] = {}
    for g in groups:
        for m, acqs in g.acquisitions.items():
            used.setdefault(m, set()).update(a.sensor for a in acqs)
    out = {}
    for m, names in used.items():
        specs = [SENSORS[n] for n in sorted(names)]
        for spec in specs:
            if len(spec.model_bands) != CHANNELS[m] or spec.dtype != STORE_DTYPES[m]:
                raise ValueError(
                    f"sensor {spec.name!r} feeds modality {m!r} with {len(spec.model_bands)} "
                    f"model band(s) of {spec.dtype}; {m!r} takes {CHANNELS[m]} of "
                    f"{STORE_DTYPES[m]}"
                )
        stats = {(tuple(s.mean), tuple(s.std)) for s in specs}
        if len(stats) > 1:
            raise ValueError(
                f"sensors {sorted(names)} of modality {m!r} have different normalisation "
                "statistics; ingest them into separate manifests"
            )
        mean, std = stats.pop()
        out[m] = {"sensors": sorted(names), "mean": list(mean), "std": list(std)}
    return out


# HR tile side (px) past which an automatic hr_ratio is refused (the paper's: 64 x 32 = 2048).
MAX_AUTO_HR_TILE = 2048


def make_plan(groups: list[Group], cfg: IngestConfig) -> Plan:
    mods = tuple(m for m in MODALITIES if any(g.acquisitions.get(m) for g in groups))
    if not mods:
        raise BadInputError("source", "no usable GeoTIFF found (see the bad files)")
    sensor_normalisation(groups)  # fail early on sensors that do not fit the contract
    first_hr = next((g.acquisitions["hr"][0] for g in groups if g.acquisitions.get("hr")), None)
    if mods == ("hr",):
        gsd = cfg.hr_gsd or round(_hr_ground_gsd(first_hr), 3)
        return Plan(mods, cfg.hr_tile_size, gsd, 1, True)
    ratio = 1
    if "hr" in mods and cfg.hr_ratio:
        ratio = cfg.hr_ratio
        if cfg.tile_size * ratio > MAX_AUTO_HR_TILE:  # asked for: allowed, but said
            log.warning(
                "HR tiles of %d px (tile_size %d x hr_ratio %d, as set): memory and shards grow "
                "with their square",
                cfg.tile_size * ratio,
                cfg.tile_size,
                ratio,
            )
    elif "hr" in mods:
        hr_gsd = _hr_ground_gsd(first_hr)
        ratio = max(1, round(cfg.gsd / hr_gsd))
        if cfg.tile_size * ratio > MAX_AUTO_HR_TILE:
            # Seen: 0.2 m aerial RGB beside S2 gave ratio 65, 4160 px HR tiles and 43 GB of
            # mostly empty shards before the disk filled. Such a ratio must be asked for.
            raise BadInputError(
                first_hr.files[0],
                f"HR imagery at {hr_gsd:.3g} m over the {cfg.gsd:g} m Sentinel "
                f"grid needs hr_ratio {ratio}: HR tiles of {cfg.tile_size * ratio} px (tile_size "
                f"{cfg.tile_size}), {ratio * ratio} HR pixels per Sentinel pixel; set hr_ratio "
                f"(the paper: 32, 2048 px HR over 64 px tiles; the HR imagery is resampled to "
                f"it) or ingest the HR imagery on its own",
            )
    return Plan(mods, cfg.tile_size, cfg.gsd, ratio, False)


# ---------------------------------------------------------------------------- labels, splits


def read_labels(src: Path, cfg: IngestConfig) -> tuple[dict, list[str] | None]:
    """{group or key: (labels list, split or None)} from the labels CSV, and the class order."""
    path = Path(cfg.labels_file) if cfg.labels_file else (src / "labels.csv")
    out = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if "group" not in row or "label" not in row:
                    raise ValueError(f"{path}: needs columns group, label (got {list(row)})")
                labs = [x for x in row["label"].split(";") if x != ""]
                out[row["group"]] = (labs, row.get("split") or None)
    elif cfg.labels_file:
        raise FileNotFoundError(f"labels_file {path} not found")
    classes = None
    cpath = path.parent / "classes.txt"
    if cpath.is_file():
        classes = [ln.strip() for ln in cpath.read_text().splitlines() if ln.strip()]
    return out, classes


def split_of(name: str, cfg: IngestConfig) -> str:
    h = int(hashlib.sha1(f"{cfg.split_seed}:{name}".encode()).hexdigest()[:8], 16) / 2**32
    if h < cfg.val_fraction:
        return "val"
    if h < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


def labels_and_splits(groups, label_map, class_order, cfg):
    """Per place: (label indices,) and split; the label kind and the class names."""
    raw = {}
    for g in groups:
        entry = label_map.get(g.name) or label_map.get(g.key)
        if entry is not None:
            raw[g.name] = (entry[0], entry[1])
        elif g.labels is not None:
            raw[g.name] = (g.labels, None)
        else:
            raw[g.name] = ([], None)
    names = sorted({x for labs, _ in raw.values() for x in labs})
    multi = any(len(labs) > 1 for labs, _ in raw.values()) or any(g.labels for g in groups)
    kind = "none" if not names else ("multi" if multi else "single")
    if class_order:
        unknown = set(names) - set(class_order)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not in classes.txt")
        classes = class_order
    elif names and all(n.lstrip("-").isdigit() for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
    else:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    labels = {n: tuple(index[x] for x in labs) for n, (labs, _) in raw.items()}
    splits = {n: sp or split_of(n, cfg) for n, (_, sp) in raw.items()}
    return labels, splits, kind, classes

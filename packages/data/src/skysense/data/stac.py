"""STAC input for ingest: a catalogue, an ItemCollection or a STAC GeoParquet file -> places.

``skysense ingest catalog.json DST`` (or ``items.json``, ``items.parquet``) reads the items
instead of walking a folder:

- **files**: each item's assets; an asset is a band of a sensor when its ``eo:bands`` entry
  (item assets or, in STAC 1.1, ``bands``) gives a common name or a band name, or when its key
  is one (``blue``, ``B02``, ``nir08``, ``rededge1``, ``vv``, ``visual``...). Common names map to
  Sentinel-2 bands (blue B2, green B3, red B4, rededge071/rededge1 B5, rededge075/rededge2 B6,
  rededge078/rededge3 B7, nir B8, nir08 B8A, swir16 B11, swir22 B12, and coastal, nir09,
  cirrus for B1, B9, B10); ``vv``/``vh`` are Sentinel-1; an asset with red, green and blue
  bands (``visual``, an RGB orthophoto) is an HR stack. Other assets (thumbnails, metadata,
  masks without a band) are ignored.
- **sensor**: ``platform``/``constellation`` (sentinel-2*, sentinel-1*) or the bands; the
  Sentinel-2 level from ``processing:level``/``s2:product_type``/the collection id (L1C, L2A),
  else as in folders (B10 present: L1C, else ``s2_default``); ``s1_default`` for SAR.
- **date**: the item's ``datetime`` (or ``start_datetime``), as a UTC date.
- **place**: the item's collection (or "stac") split by footprint overlap exactly as files in a
  folder are (:func:`skysense.data.discover.discover`); ``group_pattern`` (a regex with a named
  group ``group``) on the item id names places instead.
- **hrefs**: relative hrefs resolve against the catalogue file; ``http(s)://`` hrefs are read
  through GDAL's ``/vsicurl?url=...`` and ``s3://`` ones through ``/vsis3/`` (remote reading is
  not tested here: no network).

Reading is done by pystac (catalogues, ItemCollections; the ``skysense-data[scale]`` extra)
and pyarrow (GeoParquet: one row per item, ``assets`` a struct column as written by
stac-geoparquet). A bad asset (unreadable, no CRS) is reported like a bad file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import rasterio

from skysense.data.discover import FileInfo, Group, _split_places, _wgs84_bounds
from skysense.data.io import BadInputError, open_raster

log = logging.getLogger(__name__)

STAC_SUFFIXES = (".json", ".geojson", ".parquet", ".geoparquet")

# STAC common names (eo extension) and usual asset keys -> the sensors' band names.
S2_COMMON = {
    "coastal": "B1",
    "blue": "B2",
    "green": "B3",
    "red": "B4",
    "rededge071": "B5",
    "rededge1": "B5",
    "rededge075": "B6",
    "rededge2": "B6",
    "rededge078": "B7",
    "rededge3": "B7",
    "nir": "B8",
    "nir08": "B8A",
    "nir09": "B9",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
}
_S2_NAME = re.compile(r"^B0?(\d{1,2}|8A)$", re.I)
S1_COMMON = {"vv": "VV", "vh": "VH"}


def is_stac(path) -> bool:
    """True when ``path`` is a file that holds STAC (a JSON catalogue, collection, item or
    ItemCollection, or a GeoParquet table)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in STAC_SUFFIXES:
        return False
    if p.suffix.lower() in (".parquet", ".geoparquet"):
        return True
    try:
        with open(p) as f:
            head = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and (
        "stac_version" in head or head.get("type") in ("FeatureCollection", "Catalog")
    )


def _items_json(path: Path) -> list[dict]:
    try:
        import pystac
    except ImportError as e:
        raise ImportError(
            "STAC catalogues are read with pystac: install skysense-data[scale]"
        ) from e
    d = json.loads(path.read_text())
    if d.get("type") == "FeatureCollection":
        ic = pystac.ItemCollection.from_file(str(path))
        items = list(ic.items)
    elif d.get("type") == "Feature":
        items = [pystac.Item.from_file(str(path))]
    else:
        cat = pystac.read_file(str(path))
        items = list(cat.get_items(recursive=True))
    out = []
    for it in items:
        rec = it.to_dict(include_self_link=False, transform_hrefs=False)
        # hrefs as the catalogue resolves them (relative to each item's own file)
        for key, asset in it.assets.items():
            rec["assets"][key]["href"] = asset.get_absolute_href() or asset.href
        rec["_base"] = str(path.parent)
        out.append(rec)
    return out


def _items_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    out = []
    for row in pq.read_table(path).to_pylist():
        props = {k: v for k, v in row.items() if k not in ("assets", "geometry", "links")}
        if isinstance(props.get("datetime"), dt.datetime):
            props["datetime"] = props["datetime"].isoformat()
        assets = {k: v for k, v in (row.get("assets") or {}).items() if v}
        out.append(
            {
                "id": row.get("id"),
                "collection": row.get("collection"),
                "properties": props,
                "assets": assets,
                "_base": str(path.parent),
            }
        )
    return out


def read_items(path) -> list[dict]:
    """The STAC items under ``path`` as dicts (``id``, ``collection``, ``properties``,
    ``assets`` with absolute hrefs where they resolve), in the catalogue's order."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        return _items_parquet(path)
    return _items_json(path)


def _gdal_path(href: str, base: str) -> str:
    if href.startswith(("http://", "https://")):
        # GDAL's "/vsicurl?url=<encoded URL>" form: no "//" that a Path would fold into "/"
        return "/vsicurl?url=" + quote(href, safe="")
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    if href.startswith("file://"):
        href = href[7:]
    p = Path(href)
    return str(p if p.is_absolute() else Path(base) / p)


def _item_date(props: dict) -> dt.date | None:
    s = props.get("datetime") or props.get("start_datetime")
    if not s:
        return None
    if isinstance(s, dt.datetime):
        return s.astimezone(dt.timezone.utc).date() if s.tzinfo else s.date()
    t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    return t.astimezone(dt.timezone.utc).date() if t.tzinfo else t.date()


def _asset_bands(key: str, asset: dict) -> list[str]:
    """Names of the bands an asset holds: eo:bands (or bands) common names / names, else its
    key; lower case."""
    entries = asset.get("eo:bands") or asset.get("bands") or []
    names = []
    for e in entries:
        if isinstance(e, dict):
            names.append(str(e.get("common_name") or e.get("eo:common_name") or e.get("name")))
    return [n.lower() for n in names] if names else [key.lower()]


def _s2_band(name: str) -> str | None:
    if name in S2_COMMON:
        return S2_COMMON[name]
    m = _S2_NAME.match(name)
    if m:
        b = m.group(1).upper()
        return f"B{b}" if b == "8A" else f"B{int(b)}"
    return None


def _s2_level(item: dict) -> str | None:
    props = item.get("properties", {})
    text = " ".join(
        str(x)
        for x in (
            props.get("processing:level"),
            props.get("s2:product_type"),
            item.get("collection"),
        )
        if x
    ).upper()
    if "L1C" in text:
        return "s2_l1c"
    if "L2A" in text:
        return "s2_l2a"
    return None


def _item_files(item: dict, cfg, bad: list) -> list[FileInfo]:
    props = item.get("properties", {})
    platform = str(props.get("platform") or props.get("constellation") or "").lower()
    date = _item_date(props)
    files = []
    for key, asset in sorted(item.get("assets", {}).items()):
        href = asset.get("href")
        roles = asset.get("roles") or []
        if not href or any(r in ("thumbnail", "overview", "metadata") for r in roles):
            continue
        names = _asset_bands(key, asset)
        modality, band, stack = None, None, []
        if len(names) >= 3 and {"red", "green", "blue"} <= set(names):
            if "sentinel-2" not in platform:
                modality, stack = "hr", ["R", "G", "B"] + (["alpha"] if len(names) > 3 else [])
        elif len(names) == 1 and names[0] in S1_COMMON and "sentinel-2" not in platform:
            modality, band = "s1", S1_COMMON[names[0]]
        elif len(names) == 1 and _s2_band(names[0]) and "sentinel-1" not in platform:
            modality, band = "s2", _s2_band(names[0])
        if modality is None:
            continue
        path = _gdal_path(href, item["_base"])
        try:
            with open_raster(path, check_pixels=False) as ds:
                crs, bounds, res = ds.crs, tuple(ds.bounds), ds.res
                wgs84 = _wgs84_bounds(ds.crs.to_wkt(), bounds)
        except BadInputError as e:
            bad.append((path, e.reason))
            continue
        except rasterio.errors.RasterioError as e:
            bad.append((path, f"unreadable: {e}"))
            continue
        if modality == "s2":
            sensor = _s2_level(item)
        elif modality == "s1":
            sensor = cfg.s1_default
        else:
            sensor = "hr_rgb"
        files.append(
            FileInfo(
                path=Path(path),
                rel=f"{item.get('id')}/{key}",
                kind="stack" if stack else "band",
                modality=modality,
                sensor=sensor,
                band=band,
                stack_bands=stack,
                date=date,
                crs=crs,
                bounds=bounds,
                wgs84=wgs84,
                res=res,
                unit=f"stac-item:{item.get('id')}",  # an item's band assets: one acquisition
            )
        )
    return files


def discover_stac(path, cfg, bad: list) -> list[Group]:
    """The places of a STAC catalogue, ItemCollection or GeoParquet file (see the module
    docstring), in a deterministic order; ``bad`` collects ``(path, reason)``."""
    items = read_items(path)
    if not items:
        raise BadInputError(path, "the STAC source holds no item")
    by_key: dict[str, list[FileInfo]] = defaultdict(list)
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    for item in items:
        key = item.get("collection") or "stac"
        if pattern is not None:
            m = pattern.search(str(item.get("id")))
            if m and m.groupdict().get("group"):
                key = m.group("group")
        files = _item_files(item, cfg, bad)
        if not files:
            log.info("STAC item %s: no asset with a known band; ignored", item.get("id"))
        by_key[key].extend(files)
    groups: list[Group] = []
    for key in sorted(by_key):
        for g in _split_places(key, by_key[key], bad, cfg):
            groups.append(g)
    return groups

"""Shards: many samples per folder of pixel-interleaved ``.npy`` arrays, read by memory map.

A shard is a folder ``shards/shard-000042/`` holding, for its ``N`` samples:

================== ============================= =============================================
file               shape, dtype                  meaning
================== ============================= =============================================
``s2.npy``         (N, T, h, w, 10) uint16       Sentinel-2 digital numbers, model band order
``s1.npy``         (N, T, h, w, 2) float32       Sentinel-1 VV, VH in dB (NaN = no data)
``hr.npy``         (N, H, W, 3) uint8            HR RGB
``<m>_mask.npy``   (N, T, h, w) / (N, H, W) u8   bit 0: has data, bit 1: clear (not cloud)
``<m>_days.npy``   (N, T) / (N,) int32           acquisition date, days since 1970-01-01 (0: unknown)
``<m>_step.npy``   (N, T) / (N,) uint8           0 padding, 1 present but unusable, 2 usable
``shard.json``     -                             N, the arrays' shapes and dtypes
================== ============================= =============================================

Compressed shards (``shard_format=compressed``) hold ``hr``, ``s2`` and ``s1`` encoded instead
(``<m>.enc`` + ``<m>_index.npy``, listed under ``encoded`` in ``shard.json``; see
:mod:`skysense.data.shard_codecs`); :class:`ShardReader` decodes them on access.

``T`` is the longest series of the shard (shorter ones are padded with step 0). Pixels are
interleaved (channels last), which is what DALI's numpy reader and ``np.load(mmap_mode="r")``
read fastest; a loader reads a sample's steps and crop window without decoding anything.
Shards are written under ``<name>.tmp`` and renamed when complete, so a folder named
``shard-*`` (no suffix) is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_]+")
HAS_DATA, CLEAR = 1, 2
STEP_ABSENT, STEP_UNUSABLE, STEP_USABLE = 0, 1, 2
STORE_DTYPE = {"hr": np.uint8, "s2": np.uint16, "s1": np.float32}
FILL = {"hr": 0, "s2": 0, "s1": np.nan}


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be
    opened. Also the tasks' checkpoints use it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(
    root, index: int, arrays: dict[str, np.ndarray], codecs: dict | None = None, quality: int = 90
) -> Path:
    """Write ``arrays`` (name -> array, first axis = sample) as shard ``index`` under ``root``.

    The arrays land in ``shard-<index>.tmp`` first, are flushed to disk, and the folder is then
    renamed: an interrupted write leaves only a ``.tmp`` folder, which readers ignore and the
    next ingest removes. ``codecs`` ({array name: codec}) stores those arrays encoded
    (:mod:`skysense.data.shard_codecs`; ``quality``: JPEG quality). Returns the shard folder's
    path relative to ``root``.
    """
    root = Path(root)
    final = root / SHARD_DIR / shard_name(index)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if final.exists():
        # A shard written by an interrupted run that never reached the manifest: redo it.
        shutil.rmtree(final)
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"shard {index}: arrays disagree on the number of samples: {n}")
    info = {"n": n.pop(), "arrays": {}}
    codecs = codecs or {}
    if codecs:
        info["encoded"] = {}
    current = tmp
    try:
        tmp.mkdir(parents=True)
        for name, a in arrays.items():
            if name in codecs:
                from skysense.data.shard_codecs import write_encoded

                current = tmp / f"{name}.enc"
                info["encoded"][name] = write_encoded(tmp, name, a, codecs[name], quality)
                continue
            a = np.ascontiguousarray(a)
            current = tmp / f"{name}.npy"
            with open(current, "wb") as f:
                np.save(f, a)
                f.flush()
                os.fsync(f.fileno())
            info["arrays"][name] = {"shape": list(a.shape), "dtype": a.dtype.name}
        current = tmp / "shard.json"
        current.write_text(json.dumps(info, indent=1))
        fsync_dir(tmp)
        current = final
        tmp.rename(final)
    except OSError as e:
        # A full disk or a folder that became unwritable: no half shard stays behind, and the
        # error names the file (writes through a file object do not say which file failed).
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(current)) from e
        raise
    fsync_dir(final.parent)
    return final.relative_to(root)


def clean_partial(root, keep: int) -> None:
    """Remove ``.tmp`` shard folders and shards numbered ``keep`` or above (not in the manifest)."""
    d = Path(root) / SHARD_DIR
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("shard-"):
            try:
                i = int(p.name.split("-")[1])
            except ValueError:
                continue
            if i >= keep:
                log.info("removing %s: written by an interrupted ingest, not in the manifest", p)
                shutil.rmtree(p, ignore_errors=True)


def pack(
    tiles: list[dict], modalities: tuple[str, ...], shapes: dict | None = None
) -> dict[str, np.ndarray]:
    """Stack tile records into shard arrays (time padded to the longest series).

    A tile record holds, per modality present, ``data`` ((T, h, w, C), or (H, W, 3) for hr),
    ``mask`` (uint8 bits), ``days`` (int32) and ``step`` (uint8); see :mod:`skysense.data.ingest`.
    A modality a tile lacks is stored as padding (step 0). ``shapes`` ({modality: (h, w, C)})
    gives the pixel shape of a modality that no tile of the shard has (else ValueError).
    """
    out: dict[str, np.ndarray] = {}
    n = len(tiles)
    for m in modalities:
        have = [t[m] for t in tiles if t.get(m) is not None]
        if not have:
            if not shapes or m not in shapes:
                raise ValueError(f"no tile of this shard has modality {m!r}")
            shape = tuple(shapes[m])
            empty = np.zeros(shape if m == "hr" else (1, *shape), STORE_DTYPE[m])
            have = [{"data": empty}]
        ref = have[0]["data"]
        if m == "hr":
            data = np.zeros((n, *ref.shape), STORE_DTYPE[m])
            mask = np.zeros((n, *ref.shape[:2]), np.uint8)
            days = np.zeros(n, np.int32)
            step = np.zeros(n, np.uint8)
            for i, t in enumerate(tiles):
                if t.get(m) is not None:
                    data[i], mask[i] = t[m]["data"], t[m]["mask"]
                    days[i], step[i] = t[m]["days"], t[m]["step"]
        else:
            T = max([len(t[m]["data"]) for t in tiles if t.get(m) is not None], default=1)
            T = max(T, 1)
            data = np.full((n, T, *ref.shape[1:]), FILL[m], STORE_DTYPE[m])
            mask = np.zeros((n, T, *ref.shape[1:3]), np.uint8)
            days = np.zeros((n, T), np.int32)
            step = np.zeros((n, T), np.uint8)
            for i, t in enumerate(tiles):
                if t.get(m) is None:
                    continue
                k = len(t[m]["data"])
                data[i, :k], mask[i, :k] = t[m]["data"], t[m]["mask"]
                days[i, :k], step[i, :k] = t[m]["days"], t[m]["step"]
        out[m], out[f"{m}_mask"], out[f"{m}_days"], out[f"{m}_step"] = data, mask, days, step
    return out


class ShardReader:
    """Memory-mapped access to a manifest's shards (a few hundred kept open, least recent out)."""

    def __init__(self, manifest, max_open: int = 256):
        self.manifest = manifest
        self.max_open = max_open
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __getstate__(self):
        # Memory maps do not cross process boundaries; each worker opens its own.
        return {"manifest": self.manifest, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["manifest"], state["max_open"])

    def arrays(self, shard: int) -> dict[str, np.ndarray]:
        shard = int(shard)
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        d = self.manifest.shard_dir(shard)
        info_path = d / "shard.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{d}: shard missing or incomplete (no shard.json)")
        info = json.loads(info_path.read_text())
        encoded = info.get("encoded", {})
        for name in [*info["arrays"], *encoded]:
            # Names come from a file: a name with a path in it would read outside the shard.
            if not _ARRAY_NAME.fullmatch(str(name)):
                from skysense.data.manifest import ManifestError

                raise ManifestError(f"{info_path}: array name {name!r} is not a plain name")
        arrs = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in info["arrays"]}
        if encoded:
            from skysense.data.shard_codecs import EncodedArray

            arrs.update({name: EncodedArray(d, name, e) for name, e in encoded.items()})
        self._open[shard] = arrs
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrs


def sample_checksums(manifest) -> list[tuple]:
    """Per sample, in id order: its manifest row and a SHA-256 of each of its decoded arrays.

    Two ingests hold the same data exactly when these lists are equal, whatever the shards'
    storage (raw ``.npy`` or compressed): what is compared is what a loader reads.
    ``manifest``: a :class:`~skysense.data.manifest.Manifest`.
    """
    import hashlib

    reader = ShardReader(manifest)
    rows = manifest.query(
        "SELECT id, name, grp, split, shard, offset, lat, lon, label, labels, "
        "hr_dates, hr_valid, s2_dates, s2_valid, s1_dates, s1_valid FROM samples ORDER BY id"
    )
    out = []
    for row in rows:
        arrays = reader.arrays(row[4])
        sums = {}
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name][row[5]])
            sums[name] = hashlib.sha256(a.tobytes() + str((a.dtype, a.shape)).encode()).hexdigest()
        out.append((row, sums))
    return out

"""The manifest: one SQLite file (stdlib) that lists every sample of an ingested data set.

It scales to millions of samples (one row per sample, indexed by split) and is written in
transactions: ingest commits a shard's rows only after the shard's files are complete on disk,
and sets ``meta.complete`` last, so a killed ingest never leaves a manifest that looks complete.

Tables:

- ``meta(key, value)``: JSON values: ``complete``, ``version``, ``config`` (the ingest settings),
  ``modalities``, ``tile_size``, ``hr_ratio``, ``gsd``, ``label_kind`` (none/single/multi).
- ``samples``: one row per sample: ``id`` (the ``sample_id`` of batches), ``name``, ``grp``
  (the place it was cut from), ``split``, ``shard``, ``offset`` (row within the shard),
  ``lat``/``lon`` of the tile centre, ``label`` (class index, -1 none), ``labels`` (JSON list of
  class indices for multi-label sets), ``crs``, tile ``minx miny maxx maxy`` in that CRS,
  ``row``/``col`` (tile origin in the place's grid), and per modality ``<m>_dates`` (ISO dates,
  comma-separated, one per step) and ``<m>_valid`` (one '0'/'1' per step: usable or not).
- ``shards(id, path, n, ...)``: the shard folders, relative to the manifest.
- ``groups(grp, crs, transform, height, width, hr_ratio, n_tiles, shard, src)``: each place's
  grid and the source folder it came from (to re-read the
  sources, as the benchmark's baseline does), ``acquisitions(grp, modality, step, sensor, days,
  files)``: the source files of each step.
- ``shard_stats`` (per shard and place, for resuming and for redoing a place) and ``band_stats(modality, band, count, mean, std,
  min, max)``: per-band statistics over the usable pixels of the stored tiles.
- ``bad_files(path, reason, grp, size, mtime_ns)``: the per-file report of bad inputs, one row
  per file (``grp``: the place that found it while being aligned, NULL for files that discovery
  refused; ``size``, ``mtime_ns``: the file as it was, so that the next ingest sees a fix).
  ``classes(idx, name)``.

Paths read from the manifest are confined: a shard path must resolve inside the manifest's
folder (``../elsewhere`` or an absolute path is a :class:`ManifestError` naming both).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 1
FILENAME = "manifest.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards(
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, n INTEGER NOT NULL, steps TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, split TEXT NOT NULL,
    shard INTEGER NOT NULL, offset INTEGER NOT NULL, lat REAL, lon REAL,
    label INTEGER NOT NULL DEFAULT -1, labels TEXT, crs TEXT,
    minx REAL, miny REAL, maxx REAL, maxy REAL, row INTEGER, col INTEGER,
    hr_dates TEXT, hr_valid TEXT, s2_dates TEXT, s2_valid TEXT, s1_dates TEXT, s1_valid TEXT);
CREATE INDEX IF NOT EXISTS samples_split ON samples(split, id);
CREATE TABLE IF NOT EXISTS groups(
    grp TEXT PRIMARY KEY, crs TEXT, transform TEXT, height INTEGER, width INTEGER,
    hr_ratio INTEGER, n_tiles INTEGER, shard INTEGER, src TEXT);
CREATE TABLE IF NOT EXISTS acquisitions(
    grp TEXT NOT NULL, modality TEXT NOT NULL, step INTEGER NOT NULL, sensor TEXT,
    days INTEGER, files TEXT, PRIMARY KEY(grp, modality, step));
CREATE TABLE IF NOT EXISTS shard_stats(
    shard INTEGER, modality TEXT, band TEXT, count INTEGER, sum REAL, sumsq REAL,
    min REAL, max REAL, grp TEXT);
CREATE TABLE IF NOT EXISTS band_stats(
    modality TEXT, band TEXT, count INTEGER, mean REAL, std REAL, min REAL, max REAL,
    PRIMARY KEY(modality, band));
CREATE TABLE IF NOT EXISTS bad_files(
    path TEXT PRIMARY KEY, reason TEXT, grp TEXT, size INTEGER, mtime_ns INTEGER);
CREATE TABLE IF NOT EXISTS classes(idx INTEGER PRIMARY KEY, name TEXT);
"""


class ManifestError(RuntimeError):
    """A manifest that cannot be used (missing, from an unfinished ingest, another version)."""


def manifest_path(path) -> Path:
    """``path`` itself if it is a file, else ``path/manifest.sqlite``."""
    p = Path(path)
    return p / FILENAME if p.is_dir() else p


def _stat(path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a file, (None, None) when it is gone."""
    try:
        st = Path(path).stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


class ManifestWriter:
    """The ingest side: creates the schema, commits shards in transactions, finalises."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.executescript(SCHEMA)
        self._migrate()
        self.db.commit()

    def _migrate(self) -> None:
        """Columns that manifests of earlier ingests lack."""
        for table, col, kind in (
            ("groups", "src", "TEXT"),
            ("bad_files", "grp", "TEXT"),
            ("bad_files", "size", "INTEGER"),
            ("bad_files", "mtime_ns", "INTEGER"),
            ("shard_stats", "grp", "TEXT"),
        ):
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")

    def close(self):
        self.db.close()

    def get_meta(self, key, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, **kv) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in kv.items()],
            )

    def done_groups(self) -> dict[str, str | None]:
        """{place: its source folder} of the places committed whole."""
        return dict(self.db.execute("SELECT grp, src FROM groups").fetchall())

    def committed_tiles(self, groups) -> set[str]:
        """Names of the committed samples of ``groups`` (places an interrupted run left half
        done: their tiles in committed shards are not written again)."""
        groups = list(groups)
        out: set[str] = set()
        for i in range(0, len(groups), 500):
            part = groups[i : i + 500]
            q = f"SELECT name FROM samples WHERE grp IN ({', '.join('?' * len(part))})"
            out.update(r[0] for r in self.db.execute(q, part))
        return out

    def n_shards(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM shards").fetchone()[0]

    def n_samples(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def commit(
        self,
        shards: list[tuple[dict, list[dict], list[tuple]]],
        groups: list[dict],
        last_shard: int | None = None,
    ):
        """One transaction: shards (each with its sample rows and statistics) and the places
        they complete. Until it commits, the shards' folders are not part of the data set."""
        with self.db:
            for shard, samples, stats in shards:
                self.db.execute(
                    "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)",
                    (shard["id"], shard["path"], shard["n"], json.dumps(shard["steps"])),
                )
                if samples:
                    cols = list(samples[0])
                    self.db.executemany(
                        f"INSERT INTO samples ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})",
                        [tuple(s[c] for c in cols) for s in samples],
                    )
                self.db.executemany(
                    "INSERT INTO shard_stats "
                    "(shard, modality, band, count, sum, sumsq, min, max, grp) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(shard["id"], *s) if len(s) == 8 else (shard["id"], *s, None) for s in stats],
                )
            last = shards[-1][0]["id"] if shards else (-1 if last_shard is None else last_shard)
            for g in groups:
                self._insert_group(g, last)

    def _insert_group(self, g: dict, shard: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO groups "
            "(grp, crs, transform, height, width, hr_ratio, n_tiles, shard, src) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                g["grp"],
                g["crs"],
                json.dumps(g["transform"]),
                g["height"],
                g["width"],
                g["hr_ratio"],
                g["n_tiles"],
                shard,
                g.get("src"),
            ),
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO acquisitions VALUES (?, ?, ?, ?, ?, ?)",
            [
                (g["grp"], a["modality"], a["step"], a["sensor"], a["days"], a["files"])
                for a in g["acquisitions"]
            ],
        )

    def commit_groups_without_tiles(self, groups: list[dict]) -> None:
        """Record places that gave no tile (so a resumed ingest does not redo them)."""
        with self.db:
            for g in groups:
                self._insert_group(g, -1)

    def add_bad_files(self, bad: list[tuple[str, str]], grp: str | None = None) -> None:
        """Record bad files (the first reason of a file is kept: one row per file)."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO bad_files (path, reason, grp, size, mtime_ns) "
                "VALUES (?, ?, ?, ?, ?)",
                [(p, r, grp, *_stat(p)) for p, r in bad],
            )

    def changed_places(self, groups) -> set[str]:
        """Of the committed places among ``groups`` (discovered now, with ``name`` and
        ``files``), those whose sources changed since: a file that was bad has changed or gone,
        or discovery now finds a file the place was made without (a repaired band, say)."""
        done = set(self.done_groups())
        out: set[str] = set()
        for path, grp, size, mtime in self.db.execute(
            "SELECT path, grp, size, mtime_ns FROM bad_files WHERE grp IS NOT NULL"
        ):
            if grp in done and _stat(path) != (size, mtime):
                out.add(grp)
        # Places recorded by an ingest that did not record its source (an earlier version) may
        # name their files relative to another working folder: only their bad files are checked.
        recorded = {r[0] for r in self.db.execute("SELECT grp FROM groups WHERE src IS NOT NULL")}
        for g in groups:
            if g.name not in recorded or g.name in out:
                continue
            known = {
                r[0] for r in self.db.execute("SELECT path FROM bad_files WHERE grp=?", (g.name,))
            }
            for (files,) in self.db.execute(
                "SELECT files FROM acquisitions WHERE grp=?", (g.name,)
            ):
                d = json.loads(files)
                known.update([d["stack"]] if "stack" in d else list(d.get("bands", {}).values()))
                known.update(p for p, _ in d.get("masks", []))
            if any(str(f) not in known for f in g.files):
                out.add(g.name)
        return out

    def drop_places(self, names) -> int:
        """Forget committed places (to redo them): their samples, statistics and records. Their
        tiles stay in the shards, unreferenced; the sample ids left are renumbered 0..n-1.
        Returns the number of samples dropped."""
        names = list(names)
        if not names:
            return 0
        with self.db:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS _drop(grp TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM _drop")
            self.db.executemany("INSERT OR IGNORE INTO _drop VALUES (?)", [(n,) for n in names])
            n = self.db.execute("DELETE FROM samples WHERE grp IN (SELECT grp FROM _drop)").rowcount
            for table in ("shard_stats", "groups", "acquisitions", "bad_files"):
                self.db.execute(f"DELETE FROM {table} WHERE grp IN (SELECT grp FROM _drop)")
            # Renumber in two passes (negative first) so that no id collides on the way.
            self.db.execute(
                "CREATE TEMP TABLE _ids AS SELECT id AS old, "
                "ROW_NUMBER() OVER (ORDER BY id) - 1 AS new FROM samples"
            )
            self.db.execute(
                "UPDATE samples SET id = -1 - (SELECT new FROM _ids WHERE old = samples.id)"
            )
            self.db.execute("UPDATE samples SET id = -1 - id")
            self.db.execute("DROP TABLE _ids")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('complete', 'false')")
        return n

    def bad_files(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT path, reason FROM bad_files ORDER BY path").fetchall()

    def forget_bad_files(self, keep_groups) -> None:
        """Drop the bad-file rows that the next run examines again: those found by discovery
        and those of places not committed (rows of committed places stay: not redone)."""
        keep = list(keep_groups)
        with self.db:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS _keep(grp TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM _keep")
            self.db.executemany("INSERT OR IGNORE INTO _keep VALUES (?)", [(g,) for g in keep])
            self.db.execute(
                "DELETE FROM bad_files WHERE grp IS NULL OR grp NOT IN (SELECT grp FROM _keep)"
            )

    def classes(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM classes ORDER BY idx")]

    def set_classes(self, names: list[str]) -> None:
        with self.db:
            self.db.execute("DELETE FROM classes")
            self.db.executemany("INSERT INTO classes VALUES (?, ?)", list(enumerate(names)))

    def finalise(self, **meta) -> None:
        """Reduce the per-shard statistics into ``band_stats`` and mark the manifest complete."""
        with self.db:
            self.db.execute("DELETE FROM band_stats")
            rows = self.db.execute(
                "SELECT modality, band, SUM(count), SUM(sum), SUM(sumsq), MIN(min), MAX(max) "
                "FROM shard_stats GROUP BY modality, band"
            ).fetchall()
            for m, b, n, s, ss, lo, hi in rows:
                mean = s / n if n else float("nan")
                var = max(0.0, ss / n - mean * mean) if n else float("nan")
                self.db.execute(
                    "INSERT INTO band_stats VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (m, b, n, mean, var**0.5, lo, hi),
                )
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in {**meta, "complete": True}.items()],
            )


@dataclass
class SampleTable:
    """The columns of ``samples`` a loader needs, as numpy arrays (row i = sample id i)."""

    id: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) object (str)
    shard: np.ndarray  # (N,) int64
    offset: np.ndarray  # (N,) int64
    latlon: np.ndarray  # (N, 2) float32, NaN unknown
    label: np.ndarray  # (N,) int64, -1 none
    labels: list  # N entries: list of class indices (multi-label) or None


class Manifest:
    """The read side: ``Manifest(path)`` (the .sqlite file or its folder).

    Raises :class:`ManifestError` for a missing file or one whose ingest did not finish.
    """

    def __init__(self, path, *, require_complete: bool = True):
        self.path = manifest_path(path)
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: no manifest (run `skysense ingest SRC DST` first)")
        self.root = self.path.parent
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            self.meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            if require_complete and not self.meta.get("complete"):
                raise ManifestError(
                    f"{self.path}: the ingest that writes it did not finish; run the same "
                    "`skysense ingest` again to resume it"
                )
            if self.meta.get("version", VERSION) != VERSION:
                raise ManifestError(
                    f"{self.path}: manifest version {self.meta.get('version')}, this code reads "
                    f"{VERSION}"
                )
            rows = db.execute(
                "SELECT id, split, shard, offset, lat, lon, label, labels FROM samples ORDER BY id"
            ).fetchall()
            self.shards = {
                r[0]: {"path": r[1], "n": r[2], "steps": json.loads(r[3])}
                for r in db.execute("SELECT id, path, n, steps FROM shards")
            }
            self.classes = [r[0] for r in db.execute("SELECT name FROM classes ORDER BY idx")]
            self.band_stats = {
                (m, b): {"count": n, "mean": mu, "std": sd, "min": lo, "max": hi}
                for m, b, n, mu, sd, lo, hi in db.execute("SELECT * FROM band_stats")
            }
            self.bad_files = db.execute("SELECT path, reason FROM bad_files").fetchall()
        except sqlite3.Error as e:
            raise ManifestError(f"{self.path}: not a readable manifest ({e})") from None
        except (ValueError, TypeError) as e:  # a meta value or steps record that is not JSON
            raise ManifestError(f"{self.path}: damaged manifest ({e})") from None
        finally:
            db.close()
        for rec in self.shards.values():
            self._confined(rec["path"])
        n = len(rows)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if n and not np.array_equal(ids, np.arange(n)):
            raise ManifestError(f"{self.path}: sample ids are not 0..{n - 1}")
        self.samples = SampleTable(
            id=ids,
            split=np.array([r[1] for r in rows], dtype=object),
            shard=np.array([r[2] for r in rows], dtype=np.int64),
            offset=np.array([r[3] for r in rows], dtype=np.int64),
            latlon=np.array(
                [
                    [np.nan if r[4] is None else r[4], np.nan if r[5] is None else r[5]]
                    for r in rows
                ],
                dtype=np.float32,
            ).reshape(n, 2),
            label=np.array([r[6] for r in rows], dtype=np.int64),
            labels=[json.loads(r[7]) if r[7] else None for r in rows],
        )

    def __len__(self) -> int:
        return len(self.samples.id)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.meta["modalities"])

    @property
    def label_kind(self) -> str:
        return self.meta.get("label_kind", "none")

    def split_ids(self, split: str | None) -> np.ndarray:
        """Sample ids of ``split`` ("train", "val", "test", or None/"all" for every sample)."""
        if split in (None, "all"):
            return self.samples.id.copy()
        ids = self.samples.id[self.samples.split == split]
        if len(ids) == 0:
            have = sorted(set(self.samples.split.tolist()))
            raise ManifestError(f"{self.path}: no sample in split {split!r} (splits: {have})")
        return ids

    def _confined(self, rel: str) -> Path:
        """``root / rel`` when it resolves inside the manifest's folder; else ManifestError."""
        root = self.root.resolve()
        p = (root / rel).resolve()
        if Path(rel).is_absolute() or not p.is_relative_to(root) or p == root:
            raise ManifestError(
                f"{self.path}: shard path {rel!r} lies outside the manifest's folder {root}; "
                "refusing to read it (a manifest names shards relative to its own folder)"
            )
        return p

    def shard_dir(self, shard: int) -> Path:
        return self._confined(self.shards[int(shard)]["path"])

    def query(self, sql: str, params=()) -> list[tuple]:
        """Run a read-only query (e.g. on ``samples``, ``acquisitions``, ``groups``)."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

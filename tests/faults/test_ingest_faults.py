"""Faults of `skysense ingest`, each through the command line in a subprocess.

Every case checks the exit code, one line ``skysense ingest: ...`` naming the file or field,
no traceback, and that no file that existed before changed (checksums before and after), plus
what the case is about (no ``.tmp`` left, the lock, the bad-file list, the resumed result).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import kill_when
from _ingest_helpers import (
    SKYSENSE,
    checksums,
    cli,
    content,
    env,
    manifest_rows,
    one_line,
    python,
    s1_place,
    s2_place,
    source,
    truncate,
)

from skysense.data.sensors import SENSORS

pytestmark = pytest.mark.faults

TILE = "tile_size=16"
N_BANDS = len(SENSORS["s2_l2a"].bands)  # per-band files of one acquisition


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A source of two places and a complete ingest of it (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("done")
    src = source(root / "src", 2)
    proc = cli(root, src, root / "dst", TILE, "plots=0")
    assert proc.returncode == 0, proc.stderr
    return src, root / "dst"


def _copy(done, tmp_path):
    src, dst = done
    shutil.copytree(dst, tmp_path / "dst")
    return src, tmp_path / "dst"


def _no_tmp(dst: Path):
    left = [p for p in dst.rglob("*") if p.name.endswith(".tmp") or p.parent.name == ".spill"]
    assert not left, left


# ----------------------------------------------------------------------------- the destination


def test_another_source_into_a_complete_dst_is_refused(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    other = source(tmp_path / "other", 1, x0=500_000.0)
    before = checksums(dst, other)
    proc = cli(tmp_path, other, dst, TILE)
    one_line(proc, "src:", dst / "manifest.sqlite", other, "mode=append", rc=2)
    assert checksums(dst, other) == before


def test_other_settings_into_a_dst_are_refused_naming_the_field(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    before = checksums(dst, src)
    proc = cli(tmp_path, src, dst, "tile_size=12")
    one_line(proc, "tile_size", "16", "12", "overwrite=true", rc=2)
    assert checksums(dst, src) == before


def test_mode_append_adds_another_source(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    n0 = manifest_rows(dst, "SELECT COUNT(*) FROM samples")[0][0]
    other = tmp_path / "other"
    s2_place(other / "far" / "20170613", dt.date(2017, 6, 13), x0=500_000.0)
    s2_place(other / "far" / "20170802", dt.date(2017, 8, 2), x0=500_000.0)
    before = checksums(src, other)
    proc = cli(tmp_path, other, dst, TILE, "mode=append", "plots=0")
    assert proc.returncode == 0, proc.stderr
    groups = dict(manifest_rows(dst, "SELECT grp, src FROM groups"))
    assert groups["far"] == str(other.resolve()) and len(groups) == 3
    n1 = manifest_rows(dst, "SELECT COUNT(*) FROM samples")[0][0]
    assert n1 == n0 + 9  # 40 px at tile 16: 3 x 3 tiles
    # both sources are recorded: either one continues the ingest without mode=append
    again = cli(tmp_path, src, dst, TILE, "plots=0")
    assert again.returncode == 0 and "(2 already done)" in again.stdout, again.stdout
    assert checksums(src, other) == before


def test_overwrite_replaces_the_ingest_of_another_source(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    other = source(tmp_path / "other", 1)
    proc = cli(tmp_path, other, dst, "tile_size=20", "overwrite=true", "plots=0")
    assert proc.returncode == 0, proc.stderr
    assert manifest_rows(dst, "SELECT grp FROM groups") == [("place_00",)]
    assert manifest_rows(dst, "SELECT COUNT(*) FROM samples")[0][0] == 4  # 40 px at tile 20
    _no_tmp(dst)


def test_a_wrong_mode_is_one_line_before_anything_is_created(done, tmp_path):
    src, _ = done
    proc = cli(tmp_path, src, tmp_path / "dst", "mode=sideways")
    one_line(proc, "mode", "sideways", rc=2)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "override,field",
    [("tile_size=abc", "tile_size"), ("min_valid_fraction=lots", "min_valid_fraction")],
)
def test_a_value_of_the_wrong_type_names_the_field(done, tmp_path, override, field):
    src, _ = done
    proc = cli(tmp_path, src, tmp_path / "dst", override)
    one_line(proc, field, override.split("=")[1], rc=2)
    assert not (tmp_path / "dst").exists()


def test_a_missing_source_names_it(tmp_path):
    proc = cli(tmp_path, tmp_path / "nowhere", tmp_path / "dst")
    one_line(proc, "src", tmp_path / "nowhere", rc=2)
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------------- the lock


def _hold_lock(dst: Path):
    """A process that holds DST's ingest lock (as a running ingest does) until killed."""
    dst.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys, time
        fd = os.open({str(dst / ".ingest.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, f"{{os.getpid()}}\\n".encode(), 0)
        print("held", flush=True)
        time.sleep(120)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_lock_stops_a_second_ingest_at_once(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    holder = _hold_lock(dst)
    try:
        before = checksums(dst, src)
        t0 = time.monotonic()
        proc = cli(tmp_path, src, dst, TILE)
        line = one_line(proc, ".ingest.lock", f"pid {holder.pid}", "another ingest", rc=1)
        assert time.monotonic() - t0 < 60, "the second ingest waited for the lock"
        assert "details:" in line  # the traceback went to the debug log the line names
        assert checksums(dst, src) == before
    finally:
        holder.kill()
        holder.wait()
    # the lock goes with its holder: the next ingest runs
    proc = cli(tmp_path, src, dst, TILE, "plots=0")
    assert proc.returncode == 0, proc.stderr


def test_two_concurrent_ingests_one_stops_the_other_finishes(tmp_path):
    src = source(tmp_path / "src", 2)
    dst = tmp_path / "dst"
    gate = tmp_path / "go"
    # the first ingest waits after its first shard until the test opens the gate, so the
    # second one starts while the first holds the folder
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from skysense.data import ingest as I
        orig = I.ShardStream._flush
        def gated(self):
            orig(self)
            open({str(tmp_path / "waiting")!r}, "w").close()
            t = time.time()
            while not os.path.exists({str(gate)!r}) and time.time() - t < 120:
                time.sleep(0.05)
        I.ShardStream._flush = gated
        from skysense.tasks import cli
        sys.exit(cli.main(["ingest", {str(src)!r}, {str(dst)!r}, "{TILE}", "shard_size=4",
                           "plots=0"]))
        """
    )
    first = subprocess.Popen(
        [str(SKYSENSE.parent / "python"), "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(tmp_path),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "waiting").exists():
            time.sleep(0.05)
        assert (tmp_path / "waiting").exists(), "the first ingest did not start"
        before = checksums(dst, src)
        t0 = time.monotonic()
        second = cli(tmp_path, src, dst, TILE, "shard_size=4")
        one_line(second, ".ingest.lock", f"pid {first.pid}", rc=1)
        assert time.monotonic() - t0 < 60  # at once, not after the first one
        assert checksums(dst, src) == before
        gate.touch()
        out, err = first.communicate(timeout=300)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    fresh = cli(tmp_path, src, tmp_path / "fresh", TILE, "shard_size=4", "plots=0")
    assert fresh.returncode == 0
    a, b = content(dst), content(tmp_path / "fresh")
    assert a[0] == b[0] and len(a[0]) == 18
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- kills


def test_sigkill_during_ingest_then_rerun_gives_the_same_result(tmp_path):
    src = source(tmp_path / "src", 4)
    dst = tmp_path / "dst"
    args = [str(SKYSENSE), "ingest", str(src), str(dst), TILE, "shard_size=3", "plots=0"]
    code = kill_when(
        args, lambda: len(list((dst / "shards").glob("shard-*"))) >= 2, tmp_path, env(tmp_path), 120
    )
    assert code == -signal.SIGKILL
    before = checksums(src)
    rerun = cli(tmp_path, src, dst, TILE, "shard_size=3", "plots=0")
    assert rerun.returncode == 0, rerun.stderr
    _no_tmp(dst)
    fresh = cli(tmp_path, src, tmp_path / "fresh", TILE, "shard_size=3", "plots=0")
    a, b = content(dst), content(tmp_path / "fresh")
    assert a[0] == b[0] and len(a[0]) == 4 * 9
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert checksums(src) == before and fresh.returncode == 0


def test_leftovers_of_a_killed_run_are_removed(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    (dst / "shards" / "shard-000007.tmp").mkdir()
    (dst / "shards" / "shard-000007.tmp" / "s2.npy").write_bytes(b"half")
    (dst / ".spill").mkdir()
    (dst / ".spill" / "place-x.tmp").write_bytes(b"spill")
    proc = cli(tmp_path, src, dst, TILE, "plots=0")
    assert proc.returncode == 0, proc.stderr
    _no_tmp(dst)
    assert not (dst / ".spill").exists()


# --------------------------------------------------------------------------- bad files


def _bad_source(root: Path) -> tuple[Path, Path, Path]:
    src = source(root, 1)
    broken = s2_place(root / "broken" / "20170613", dt.date(2017, 6, 13), x0=450_000.0)[1]
    truncate(broken)  # B02, the reference band
    empty = root / "empty" / "20170613"
    s2_place(empty, dt.date(2017, 6, 13), x0=460_000.0, value=0)  # 0 = S2 nodata
    return src, broken, empty


def test_bad_files_are_printed_once_each_at_the_end(tmp_path):
    src, broken, empty = _bad_source(tmp_path / "src")
    before = checksums(src)
    proc = cli(tmp_path, src, tmp_path / "dst", TILE, "plots=0")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    listed = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    paths = [ln.split(": ", 1)[0] for ln in listed]
    assert len(paths) == len(set(paths)), out  # once each
    assert str(broken) in paths and "truncated" in out
    assert sum(str(empty) in p for p in paths) == N_BANDS and "nodata" in out
    assert f"bad files ({len(paths)})" in out
    rows = manifest_rows(tmp_path / "dst", "SELECT path FROM bad_files")
    assert sorted(r[0] for r in rows) == sorted(paths)
    assert checksums(src) == before


def test_a_fixed_file_is_picked_up_on_the_next_run(tmp_path):
    src, broken, empty = _bad_source(tmp_path / "src")
    dst = tmp_path / "dst"
    assert cli(tmp_path, src, dst, TILE, "plots=0").returncode == 1
    n0 = manifest_rows(dst, "SELECT COUNT(*) FROM samples")[0][0]
    # repair both: rewrite the truncated file and give the empty place data
    shutil.rmtree(broken.parent)
    s2_place(broken.parent, dt.date(2017, 6, 13), x0=450_000.0)
    shutil.rmtree(empty)
    s2_place(empty, dt.date(2017, 6, 13), x0=460_000.0)
    proc = cli(tmp_path, src, dst, TILE, "plots=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bad files: none" in proc.stdout
    assert manifest_rows(dst, "SELECT COUNT(*) FROM bad_files") == [(0,)]
    groups = {r[0] for r in manifest_rows(dst, "SELECT grp FROM groups")}
    assert {"broken", "empty"} <= groups
    assert manifest_rows(dst, "SELECT COUNT(*) FROM samples")[0][0] == n0 + 18


def test_a_repaired_file_in_a_place_with_tiles_is_picked_up(tmp_path):
    """One acquisition of a place is truncated: the place is ingested without it. Once the file
    is repaired the next run redoes that place, and the result equals a fresh ingest's."""
    src = source(tmp_path / "src", 2)
    broken = sorted((src / "place_01" / "20170802").glob("*_B02.tif"))[0]
    good = broken.read_bytes()
    truncate(broken)
    dst = tmp_path / "dst"
    first = cli(tmp_path, src, dst, TILE, "plots=0")
    assert first.returncode == 1 and str(broken) in first.stdout, first.stdout
    assert manifest_rows(dst, "SELECT COUNT(*) FROM samples WHERE s2_dates='2017-06-13'") == [(9,)]
    broken.write_bytes(good)
    again = cli(tmp_path, src, dst, TILE, "plots=0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 redone: files changed" in again.stdout and "bad files: none" in again.stdout
    fresh = cli(tmp_path, src, tmp_path / "fresh", TILE, "plots=0")
    assert fresh.returncode == 0
    from skysense.data.manifest import Manifest
    from skysense.data.shards import ShardReader

    def by_name(d):
        m = Manifest(d)
        r = ShardReader(m)
        rows = m.query("SELECT name, shard, offset, lat, lon, s2_dates, s2_valid FROM samples")
        return {n: (rest, np.asarray(r.arrays(s)["s2"][o])) for n, s, o, *rest in rows}, m

    a, ma = by_name(dst)
    b, mb = by_name(tmp_path / "fresh")
    assert a.keys() == b.keys() and len(a) == 18
    for n in a:
        assert a[n][0] == b[n][0]
        np.testing.assert_array_equal(a[n][1], b[n][1])
    assert len(ma) == 18  # ids renumbered 0..17 (Manifest checks)
    for k, v in mb.band_stats.items():
        assert ma.band_stats[k]["count"] == v["count"]
        assert ma.band_stats[k]["mean"] == pytest.approx(v["mean"], rel=1e-9)


def test_nothing_usable_lists_the_bad_files_and_fails_in_one_line(tmp_path):
    src = tmp_path / "src"
    files = s2_place(src / "only" / "20170613")
    truncate(files[1])
    before = checksums(src)
    proc = cli(tmp_path, src, tmp_path / "dst")
    one_line(proc, src, "no tile with valid pixels", rc=2)
    assert str(files[1]) in proc.stdout  # the bad files, printed before the line
    assert checksums(src) == before
    _no_tmp(tmp_path / "dst")


def test_nan_pixels_are_nodata_and_the_place_is_kept(tmp_path):
    src = tmp_path / "src"
    s2_place(src / "nan" / "20170613", dt.date(2017, 6, 13), nan_every=3, dtype="float32")
    s1_place(src / "nan" / "20170614", dt.date(2017, 6, 14))
    proc = cli(tmp_path, src, tmp_path / "dst", TILE, "plots=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bad files: none" in proc.stdout
    from skysense.data.manifest import Manifest
    from skysense.data.shards import HAS_DATA, ShardReader

    m = Manifest(tmp_path / "dst")
    assert len(m) == 9
    mask = np.asarray(ShardReader(m).arrays(0)["s2_mask"])
    share = float((mask & HAS_DATA).astype(bool).mean())
    # Every third pixel of B4 (10 m) and B5 (20 m, resampled) is NaN: those pixels are masked
    # (a resampling kernel leaves NaN out instead of spreading it), the rest kept.
    assert 0.3 < share < 2 / 3 + 0.01
    assert set(m.query("SELECT s2_valid FROM samples")) == {("1",)}


def test_a_band_entirely_nan_is_one_bad_entry_per_file(tmp_path):
    src = source(tmp_path / "src", 1)
    s2_place(
        src / "nan" / "20170613", dt.date(2017, 6, 13), x0=470_000.0, nan_every=1, dtype="float32"
    )
    proc = cli(tmp_path, src, tmp_path / "dst", TILE, "plots=0")
    assert proc.returncode == 1
    rows = manifest_rows(tmp_path / "dst", "SELECT path, reason FROM bad_files")
    assert len(rows) == N_BANDS and len({p for p, _ in rows}) == N_BANDS
    assert all("entirely nodata" in r for _, r in rows)


# ----------------------------------------------------------------- confinement, corruption


def test_a_shard_path_outside_dst_is_refused(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    outside = tmp_path / "outside" / "shard-000000"
    shutil.copytree(dst / "shards" / "shard-000000", outside)
    db = sqlite3.connect(dst / "manifest.sqlite")
    with db:
        db.execute("UPDATE shards SET path='../outside/shard-000000' WHERE id=0")
    db.close()
    before = checksums(dst, src, outside.parent)
    # the rerun finds nothing to do and reads the shards back for its preview
    proc = cli(tmp_path, src, dst, TILE, "plots=1")
    one_line(proc, dst / "manifest.sqlite", "../outside/shard-000000", "outside")
    assert checksums(dst, src, outside.parent) == before
    assert not (dst / "plots").exists()


def test_a_corrupt_manifest_names_it(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    (dst / "manifest.sqlite").write_bytes(b"this is not a database" * 100)
    before = checksums(dst, src)
    proc = cli(tmp_path, src, dst, TILE)
    one_line(proc, dst / "manifest.sqlite", "overwrite=true")
    assert checksums(dst, src) == before


# ------------------------------------------------------------------ environment faults


def test_dst_under_a_file_is_one_line_naming_it(done, tmp_path):
    src, _ = done
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = checksums(src, blocker)
    proc = cli(tmp_path, src, blocker / "dst", TILE)
    one_line(proc, blocker, rc=1)
    assert checksums(src, blocker) == before


def _mount_tmpfs(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opt = ",".join(("size=1m", *options))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opt, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_unwritable_dst_is_one_line_naming_it(done, tmp_path):
    src, _ = done
    dst = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system then
        if not _mount_tmpfs(dst, "ro"):
            pytest.skip("root without mount: no way to make a folder unwritable")
    else:
        dst.mkdir()
        dst.chmod(0o555)
    try:
        before = checksums(src)
        proc = cli(tmp_path, src, dst, TILE)
        one_line(proc, dst, rc=1)
        assert checksums(src) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(dst)], capture_output=True)
        else:
            dst.chmod(0o755)


def test_a_full_disk_is_one_line_and_leaves_no_tmp(done, tmp_path):
    """A real full file system (a 1 MB tmpfs) where the machine allows mounting one."""
    src, _ = done
    dst = tmp_path / "small"
    if not _mount_tmpfs(dst):
        pytest.skip("cannot mount a tmpfs here (not root); the injected ENOSPC case runs")
    try:
        big = source(tmp_path / "big", 1, n10=400)  # ~30 MB of shards: more than 1 MB
        before = checksums(src, big)
        proc = cli(tmp_path, big, dst, "tile_size=32")
        one_line(proc, dst, "No space left", rc=1)
        _no_tmp(dst)
        assert checksums(src, big) == before
    finally:
        subprocess.run(["umount", str(dst)], capture_output=True)


def test_enospc_while_writing_a_shard_names_the_file(done, tmp_path):
    src, _ = done
    dst = tmp_path / "dst"
    code = textwrap.dedent(
        f"""
        import errno, sys
        import numpy as np
        orig = np.save
        calls = []
        def save(f, a, *args, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return orig(f, a, *args, **kw)
        np.save = save
        from skysense.tasks import cli
        sys.exit(cli.main(["ingest", {str(src)!r}, {str(dst)!r}, "{TILE}"]))
        """
    )
    before = checksums(src)
    proc = python(tmp_path, code)
    line = one_line(proc, "No space left", str(dst / "shards" / "shard-000000.tmp"), rc=1)
    assert ".npy" in line
    _no_tmp(dst)
    assert not list((dst / "shards").glob("shard-*")) if (dst / "shards").exists() else True
    assert checksums(src) == before


def test_a_full_disk_under_the_manifest_names_it(done, tmp_path):
    src, dst = _copy(done, tmp_path)
    # a third place makes the rerun write to the manifest, which then finds the disk full
    s2_place(tmp_path / "src3" / "p3" / "20170613", x0=480_000.0)
    code = textwrap.dedent(
        f"""
        import sqlite3, sys
        from skysense.data import manifest
        def full(self, *a, **k):
            raise sqlite3.OperationalError("database or disk is full")
        manifest.ManifestWriter.commit = full
        from skysense.tasks import cli
        sys.exit(cli.main(["ingest", {str(tmp_path / "src3")!r}, {str(dst)!r}, "{TILE}",
                           "mode=append"]))
        """
    )
    shards_before = checksums(dst / "shards")
    proc = python(tmp_path, code)
    one_line(proc, dst / "manifest.sqlite", "full", rc=1)
    _no_tmp(dst)
    # the shards that were there are untouched; the one written for the new place is not
    # in the manifest and goes at the next run
    now = checksums(dst / "shards")
    assert {k: v for k, v in now.items() if k in shards_before} == shards_before

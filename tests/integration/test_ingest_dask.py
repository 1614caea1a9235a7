"""Ingest on dask.distributed (issue 20): a 2-worker LocalCluster ingest of the shared OSCD
cities equals a one-process ingest (manifest rows and checksums of every decoded array), and
so does one where a worker process is killed mid-run (its places re-run on the other)."""

from __future__ import annotations

import os
import signal

import pytest

from skysense.data.ingest import ingest
from skysense.data.manifest import Manifest
from skysense.data.shards import sample_checksums

pytestmark = [pytest.mark.integration, pytest.mark.slow]

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (skysense-data[scale])"
)

# Small shards: the first one commits after about one place, while the others are in flight.
SETTINGS = {"shard_size": 64}


@pytest.fixture(scope="module")
def oscd(shared_data):
    src = shared_data / "oscd" / "images"
    if not src.is_dir():
        pytest.skip(f"{src} is absent (the shared OSCD cities)")
    return src


@pytest.fixture(scope="module")
def one_process(oscd, tmp_path_factory):
    dst = tmp_path_factory.mktemp("oscd_one")
    rep = ingest(oscd, dst, progress=False, workers=0, **SETTINGS)
    assert rep.ok, rep.format()
    return sample_checksums(Manifest(dst))


def _tables(dst) -> tuple:
    """The manifest beyond the samples: shards, places, acquisitions and statistics."""
    m = Manifest(dst)
    return (
        m.shards,
        m.band_stats,
        m.query("SELECT grp, crs, transform, height, width, n_tiles FROM groups ORDER BY grp"),
        m.query("SELECT * FROM acquisitions ORDER BY grp, modality, step"),
        m.query("SELECT * FROM shard_stats ORDER BY 1, 2, 3"),
    )


@pytest.fixture(scope="module")
def one_process_tables(oscd, tmp_path_factory):
    dst = tmp_path_factory.mktemp("oscd_one_tables")
    assert ingest(oscd, dst, progress=False, workers=0, **SETTINGS).ok
    return _tables(dst)


def test_two_local_workers_equal_one_process(oscd, one_process, one_process_tables, tmp_path):
    rep = ingest(oscd, tmp_path, progress=False, cluster="local:2", **SETTINGS)
    assert rep.ok and rep.n_places == 10
    got = sample_checksums(Manifest(tmp_path))
    assert len(got) == len(one_process) > 500
    assert got == one_process
    assert _tables(tmp_path) == one_process_tables
    assert not (tmp_path / ".spill").exists()


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    oscd, one_process, one_process_tables, tmp_path
):
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    killed = []
    try:
        pids = client.run(os.getpid)  # {worker address: pid}
        assert len(pids) == 2

        def kill_one(shard: int) -> None:
            if killed:
                return
            # after the first shard's commit, places are still in flight: kill the worker that
            # runs or holds the most of them (their results are lost with it)
            work = {
                a: list(client.processing([a])[a]) + list(client.has_what([a])[a]) for a in pids
            }
            victim = max(sorted(work), key=lambda a: len(work[a]))
            os.kill(pids[victim], signal.SIGKILL)
            killed.append((pids[victim], len(work[victim])))

        rep = ingest(
            oscd,
            tmp_path,
            progress=False,
            cluster=cluster.scheduler_address,
            on_shard=kill_one,
            **SETTINGS,
        )
        assert killed, "no shard was committed: the worker was never killed"
        pid, lost = killed[0]
        assert lost > 0, "the killed worker held no task: nothing had to be re-run"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert rep.ok and rep.n_places == 10
        got = sample_checksums(Manifest(tmp_path))
        assert [r[0][1] for r in got] == [r[0][1] for r in one_process]  # no tile twice or lost
        assert got == one_process
        assert _tables(tmp_path) == one_process_tables
    finally:
        client.close()
        cluster.close()


def test_compressed_shards_on_two_workers_decode_to_the_raw_arrays(oscd, one_process, tmp_path):
    # OSCD is Sentinel-2 only: 16-bit PNG is lossless, so the decoded arrays are the raw ones
    rep = ingest(
        oscd, tmp_path, progress=False, cluster="local:2", shard_format="compressed", **SETTINGS
    )
    assert rep.ok
    assert list((tmp_path / "shards").glob("shard-*/s2.enc"))
    assert sample_checksums(Manifest(tmp_path)) == one_process

"""Ingest on dask.distributed: places as tasks, shards written by workers, the manifest by us.

``cluster=local:N`` starts a ``LocalCluster`` of ``N`` worker processes (one thread each, each
with a memory limit of ``worker_memory``; the default when ``workers > 0``);
``cluster=tcp://host:port`` uses a running scheduler. Every place is one task
(:func:`align_task`: warp, mask and tile it, its tiles spilled under ``DST/.spill``); every
shard is one task (:func:`write_task`: read its tiles from the spill files, write the shard
folder). Only the ingest's own process (the Dask client) writes the manifest, one transaction
per shard, exactly as in one process.

Identical output to one process: place results are taken in the order the places were
submitted (at most ``4 x workers`` in flight), and the shard stream cuts shards from them in
that order, so shard contents, sample ids and statistics are those of a one-process run.

A worker lost mid-run (killed, out of memory) is Dask's to handle: its tasks are re-run on the
other workers (or on the worker the nanny restarts). Re-running is safe: a place task writes a
new spill file of its own (the lost one's is removed with ``.spill`` at the end), and a shard
task rewrites the shard folder from scratch (``.tmp`` then renamed). Nothing is committed to
the manifest until the task's result is back, so nothing is lost or counted twice.

With a remote cluster, ``DST`` (and the source files) must be on storage that the workers and
the client see under the same paths (a shared file system), and the workers need the same
``skysense-data`` installed (tasks are this module's functions, pickled by reference).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

log = logging.getLogger(__name__)

_LOCAL = re.compile(r"local(?::(\d+))?")


def dask_available() -> bool:
    """True when dask.distributed imports (the ``skysense-data[scale]`` extra)."""
    try:
        import distributed  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def cluster_spec(cluster: str | None, workers: int) -> tuple[str, int | str] | None:
    """("local", n) or ("address", "tcp://...") for a Dask ingest, None for no Dask.

    ``cluster`` None: a LocalCluster of ``workers`` processes when ``workers > 0`` and Dask is
    installed, else None (one process, or the process pool when Dask is absent). ``"pool"``:
    never Dask, the local process pool of ``workers`` (small ingests, where starting a cluster
    costs more than it saves).
    """
    if cluster == "pool":
        return None
    if cluster in (None, "", "none"):
        if workers and workers > 0 and dask_available():
            return ("local", int(workers))
        return None
    m = _LOCAL.fullmatch(cluster)
    if m:
        if m.group(1):
            n = int(m.group(1))
        else:
            n = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"cluster={cluster!r}: needs at least one worker")
        return ("local", n)
    if "://" in cluster:
        return ("address", cluster)
    raise ValueError(
        f"cluster must be 'local:N' or a scheduler address like 'tcp://host:8786', got {cluster!r}"
    )


def align_task(gdal: dict, *args):
    """:func:`~skysense.data.ingest_align.align_place` on a worker, in the ingest's GDAL
    environment (rasterio's environment does not travel with the task)."""
    import rasterio

    from skysense.data.ingest_align import align_place

    with rasterio.Env(**gdal):
        return align_place(*args)


def write_task(dst, sid, first_id, parts, plan, codecs=None, quality=90):
    """:func:`~skysense.data.ingest_write.build_shard` on a worker."""
    from skysense.data.ingest_write import build_shard

    return build_shard(dst, sid, first_id, parts, plan, codecs, quality)


class DaskPlaces:
    """A Dask client for one ingest (a context manager): ``places(args)`` yields aligned places
    in order, ``write(...)`` writes a shard on a worker. ``spec`` from :func:`cluster_spec`."""

    def __init__(self, spec: tuple, gdal: dict, worker_memory: str = "4GiB"):
        self.spec, self.gdal, self.worker_memory = spec, gdal, worker_memory
        self.cluster = None
        self.client = None
        self.n_workers = 1

    def __enter__(self) -> DaskPlaces:
        from distributed import Client, LocalCluster

        # The scheduler runs in this process: its INFO records (workers joining, closing) are
        # not the ingest's news; warnings and errors still show.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        kind, value = self.spec
        if kind == "local":
            self.cluster = LocalCluster(
                n_workers=int(value),
                threads_per_worker=1,
                processes=True,
                memory_limit=self.worker_memory,
                dashboard_address=None,
                silence_logs=logging.WARNING,
            )
            self.client = Client(self.cluster)
            self.n_workers = int(value)
        else:
            self.client = Client(value, timeout="30s")
            self.n_workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        log.info("ingest on Dask: %s, %d worker(s)", self.client.scheduler.address, self.n_workers)
        return self

    def __exit__(self, *exc) -> None:
        # Closing races connections that are going away on purpose; distributed logs those as
        # errors with tracebacks (CommClosedError), which are not faults of the ingest.
        quiet = logging.getLogger("distributed")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            quiet.setLevel(level)

    def places(self, args: list[tuple]) -> Iterator:
        """Aligned places (:class:`PlaceResult`) in the order of ``args``, at most
        ``4 x workers`` tasks in flight (memory on the client stays bounded)."""
        window = 4 * self.n_workers
        pending = []
        try:
            for i, a in enumerate(args):
                key = f"ingest-place-{i}-{os.getpid()}-{id(self)}"
                pending.append(self.client.submit(align_task, self.gdal, *a, key=key, pure=False))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()

    def write(self, dst, sid, first_id, parts, plan, codecs=None, quality=90):
        """:func:`write_task` on a worker; its result (what the manifest commits)."""
        key = f"ingest-shard-{sid}-{os.getpid()}-{id(self)}"
        fut = self.client.submit(
            write_task, str(dst), sid, first_id, parts, plan, codecs, quality, key=key
        )
        return fut.result()

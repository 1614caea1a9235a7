"""``cluster=`` of the Dask ingest: parsing, and the default when ``workers > 0``."""

from __future__ import annotations

import pytest

from skysense.data.ingest_dask import cluster_spec, dask_available


def test_cluster_spec():
    assert cluster_spec("local:3", 0) == ("local", 3)
    assert cluster_spec("local", 2) == ("local", 2)
    assert cluster_spec("tcp://10.0.0.1:8786", 0) == ("address", "tcp://10.0.0.1:8786")
    assert cluster_spec(None, 0) is None
    want = ("local", 2) if dask_available() else None
    assert cluster_spec(None, 2) == want
    for bad in ("local:0", "spark", "local:x"):
        with pytest.raises(ValueError, match="cluster"):
            cluster_spec(bad, 0)

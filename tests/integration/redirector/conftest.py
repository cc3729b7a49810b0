"""Fixtures of the redirector's integration tests (helpers live in redirector_minicluster.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redirector_minicluster import MiniCluster


@pytest.fixture(params=["bridge", "routed"])
def mini_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MiniCluster]:
    """Nodes n1, n2; pods a (caller) and b on n1, c on n2; whoami on b and c; ClusterIP -> c."""
    cluster = MiniCluster(prefix=f"nmrd{uuid.uuid4().hex[:5]}", cni=request.param, workdir=tmp_path)
    try:
        cluster.build()
        a = cluster.add_pod("a", 1, 5)
        b = cluster.add_pod("b", 1, 6)
        c = cluster.add_pod("c", 2, 7)
        cluster.whoami(b)
        cluster.whoami(c)
        cluster.add_cluster_ip(80, c, 8080)
        assert a.ip
        yield cluster
    finally:
        cluster.teardown()

"""Fixtures of the redirector's integration tests (helpers live in redirector_minicluster.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redirector_minicluster import MiniCluster
from redirector_minicluster import mini_cluster as make_mini_cluster


@pytest.fixture(params=["bridge", "routed"])
def mini_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MiniCluster]:
    """The mini cluster in each CNI style; always torn down."""
    with make_mini_cluster(request.param, tmp_path) as cluster:
        yield cluster

"""Fixtures of the realnode tests (issue 11): the mesh as pods on a Kubernetes-shaped sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realnode_harness import RealNode, realnode_mesh


@pytest.fixture(scope="module")
def mesh() -> Iterator[RealNode]:
    """Two nodes (bridge CNI), the API server on node1, the mesh as pods; shared by a module's tests."""
    with realnode_mesh(nodes=2) as m:
        yield m

"""One mesh-installed sandbox per CNI style, shared by every fault test (bring-up is the slow part)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults_harness import Faults, faults_cluster


@pytest.fixture(scope="package", params=["bridge", "routed"])
def faults(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    with faults_cluster(request.param, tmp_path_factory.mktemp(f"faults-{request.param}")) as f:
        yield f

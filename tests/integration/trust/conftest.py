"""One mesh-installed sandbox shared by the trust tests (bring-up is the slow part)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from trust_harness import Trust, trust_cluster


@pytest.fixture(scope="package")
def trust() -> Iterator[Trust]:
    with trust_cluster("bridge") as t:
        yield t

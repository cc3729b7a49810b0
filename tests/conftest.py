"""Shared test fixtures.

Root-only tests (network namespaces, iptables) are marked `root`. They run in CI, which is
root; on a non-root developer machine they fail loudly rather than skip silently, unless
NODEMESH_SKIP_ROOT=1 is set on purpose.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 or os.environ.get("NODEMESH_SKIP_ROOT") != "1":
        return
    skip = pytest.mark.skip(reason="NODEMESH_SKIP_ROOT=1 and not root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)

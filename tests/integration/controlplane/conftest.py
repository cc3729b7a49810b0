"""Fixtures of the controller's loopback tests (helpers: controller_link.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from controller_link import TESTDATA, write_cluster


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A sandbox state directory holding the recorded emojivoto cluster (resourceVersion 1)."""
    write_cluster(tmp_path, json.loads(TESTDATA.read_text())["items"], 1)
    return tmp_path

"""Test helper: a sandbox that always goes away.

    from nodemesh.sandbox.testing import running_sandbox

    def test_something():
        with running_sandbox(nodes=2, cni="routed", manifests=["app.yaml"]) as sb:
            pods = sb.pods("default")

or as a pytest fixture:

    @pytest.fixture
    def sandbox():
        with running_sandbox() as sb:
            yield sb

`manifests` items are file paths or YAML text (anything containing a newline is text). The
cluster name is unique per call (`t` + 8 random chars), so tests of several engineers can run at
the same time; teardown runs even when the test fails or setup dies half-way.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from nodemesh.sandbox.cluster import Sandbox


def unique_name() -> str:
    return "t" + secrets.token_hex(4)


@contextlib.contextmanager
def running_sandbox(nodes: int = 2, cni: str = "bridge", manifests: Sequence[str | Path] = (),
                    name: str | None = None, wait: bool = True, timeout: float = 30.0,
                    backoff: tuple[float, float] = (10.0, 300.0)) -> Iterator[Sandbox]:
    sb = Sandbox(name or unique_name())
    try:
        sb.up(nodes=nodes, cni=cni, backoff=backoff)
        for m in manifests:
            if isinstance(m, str) and "\n" in m:
                sb.apply(text=m)
            else:
                sb.apply(m)
        if manifests and wait:
            sb.wait_ready(timeout=timeout)
        yield sb
    finally:
        sb.down()

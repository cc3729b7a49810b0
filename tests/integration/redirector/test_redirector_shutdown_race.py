"""Shutdown while another writer changes the rules (the new redirector of a rolling update puts its
hooks back between our read of the kernel and our removal): the removal is re-read and retried, so
nothing we installed stays behind and the old redirector exits cleanly (it failed on a busy chain)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from nodemesh.redirector.apply import Netfilter, Redirector, TableState
from nodemesh.redirector.config import CaptureConfig
from nodemesh.redirector.plan import Plan, build_plan, render_iptables
from nodemesh.redirector.runner import FailOpenRunner, RunnerConfig

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nmrs{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class _RacedRedirector(Redirector):
    """After its first read of the kernel for a removal, another writer re-installs the hooks."""

    raced = False
    racing = False
    plan: Plan

    def _tables(self) -> dict[str, TableState]:
        tables = super()._tables()
        if self.racing and not self.raced:
            self.raced = True
            self.nf.restore(render_iptables(self.plan, capture=True))  # the other redirector's re-assert
        return tables


def test_redirector_shutdown_removal_retries_after_a_concurrent_write(netns: str) -> None:
    config = CaptureConfig(node_ip="10.250.0.1", pod_cidrs=("10.250.1.0/24",), bridge_replies=False)
    plan = build_plan(config)
    redirector = _RacedRedirector(Netfilter(backend="nft", netns=netns))
    redirector.plan = plan
    redirector.apply(plan)
    events: list[str] = []
    runner = FailOpenRunner(RunnerConfig(config, agent_admin="http://127.0.0.1:1", shutdown_wait_s=0),
                            redirector, log=lambda event, **_: events.append(event))
    runner.plan = plan
    redirector.racing = True
    runner.shutdown()
    assert redirector.raced and "remove_retry" in events and events[-1] == "capture_uninstalled"
    saved = Netfilter(backend="nft", netns=netns).save()
    assert "NODEMESH" not in saved and "nodemesh:" not in saved

"""Fixtures of the controller's unit tests (helpers: controller_testkit.py)."""

from __future__ import annotations

import time

import pytest
from controller_feed import peer, recorded_registry, series_for
from controller_testkit import TESTDATA
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller


@pytest.fixture
def controller() -> Controller:
    c = Controller(ControllerConfig(), registry=recorded_registry(TESTDATA))
    start = c.started_ms + 1000  # agents started after the controller: first reports are all new
    node1 = c.agent_connected(pb.AgentHello(agent_id="agent-1", node="node-1", version="0.1.0",
                                            start_time_ms=start))
    node2 = c.agent_connected(pb.AgentHello(agent_id="agent-2", node="node-2", version="0.1.0",
                                            start_time_ms=start))
    c.agent_message(node1, pb.AgentMessage(status=pb.AgentStatus(ready=True, capture_installed=True)))
    # node-2's agent is connected but not ready: its pods are not meshed.
    now = time.time()
    # Same node (node-1): web -> emoji and vote-bot -> web are seen once, recorded both ways.
    # Cross node: web (node-1) -> voting (node-2): outbound on node-1, inbound on node-2.
    node1_series = []
    for direction in ("outbound", "inbound"):
        node1_series += series_for(peer(direction, "web", "emoji", "emoji-svc"), 540, 60, 20.0)
        node1_series += series_for(peer(direction, "vote-bot", "web", "web-svc"), 120, 0, 5.0)
    node1_series += series_for(peer("outbound", "web", "voting", "voting-svc"), 300, 0, 100.0)
    c.ingest_report(node1, pb.MetricsReport(agent_id="agent-1", seq=1, series=node1_series), now=now - 5)
    c.ingest_report(node2, pb.MetricsReport(
        agent_id="agent-2", seq=1, series=series_for(peer("inbound", "web", "voting", "voting-svc"), 300, 0, 100.0)),
        now=now - 5)
    return c

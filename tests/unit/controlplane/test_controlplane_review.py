"""Regression tests found in review: numbers a user would trust wrongly, and robustness."""

from __future__ import annotations

import time

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.controller import Controller

# The synthetic cluster and its reports: the `controller` fixture of the stat tests.
from test_controlplane_stat import NS, controller, peer, series_for  # noqa: F401


def _idle_reports(c: Controller, now: float, seconds: int) -> None:
    """node-1's agent keeps reporting the same cumulative counters, every connection closed (the
    agent keeps the gauge series at 0 forever), once a second from `now`."""
    session = c.sessions["agent-1"]
    series = []
    for direction in ("outbound", "inbound"):
        series += series_for(peer(direction, "web", "emoji", "emoji-svc"), 540, 60, 20.0)
        series += series_for(peer(direction, "vote-bot", "web", "web-svc"), 120, 0, 5.0)
    series += series_for(peer("outbound", "web", "voting", "voting-svc"), 300, 0, 100.0)
    for s in series:
        if s.name == "tcp_open_connections":
            s.value = 0
    for i in range(seconds):
        c.ingest_report(session, pb.MetricsReport(agent_id="agent-1", seq=2 + i, series=series), now=now + i)


def test_closed_connections_do_not_keep_old_edges_and_peers_alive(controller: Controller) -> None:  # noqa: F811
    # Traffic happened ~5 s ago; then two idle minutes. A zero open-connection gauge is not traffic.
    now = time.time()
    _idle_reports(controller, now, 120)
    later = now + 121
    resp = controller.edges(pb.EdgesRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60),
                            now=later)
    assert resp.error == "" and list(resp.edges) == []
    req = pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60)
    getattr(req, "from").CopyFrom(pb.Resource(namespace=NS, type="deploy", name="web"))
    assert list(controller.stat(req, now=later).rows) == []

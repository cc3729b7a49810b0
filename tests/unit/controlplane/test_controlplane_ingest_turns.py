"""Reports are ingested by one task, a bounded slice per event-loop turn (ControllerConfig.ingest_turn_ms):
a backlog of reports delays their acks, not a new agent's stream (issue 16, the connect storm: a
thousand streams each ingesting in the same loop turn made turns of a second, and gRPC cancelled
the streams it could not hand over within 30 s)."""

from __future__ import annotations

import asyncio
import time

from controller_testkit import Stream, settle
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.main import parse_args

REPORTS = 1000


def report(seq: int, agent_id: str) -> pb.MetricsReport:
    series = []
    for i in range(5):
        key = ("inbound", "ns", "deployment", "web", f"web-{i}", "ns", "deployment", "api", "api-1", "", "api:80",
               "http1")
        series.append(pb.Series(name="request_total", labels=dict(zip(PEER_LABELS, key)), value=1))
    return pb.MetricsReport(agent_id=agent_id, seq=seq, time_ms=int(time.time() * 1000), increments=True,
                            series=series)


async def backlog_then_connect(turn_ms: float) -> tuple[int, int]:
    """Agent A's REPORTS reports arrive at once, then agent B connects: (A's reports ingested when
    B's first message came, A's reports ingested in the end)."""
    c = Controller(ControllerConfig(ingest_turn_ms=turn_ms))
    a = Stream(c, agent_id="node-1/1/1")
    await settle()
    for seq in range(1, REPORTS + 1):
        a.send(report(seq, "node-1/1/1"))
    b = Stream(c, agent_id="node-2/1/1")
    while not b.received:
        await asyncio.sleep(0)
    session = c.sessions["node-1/1/1"]
    at_b = session.reports
    for _ in range(2000):
        if session.reports == REPORTS:
            break
        await asyncio.sleep(0.005)
    done = session.reports
    await settle()
    assert a.acks()[-1] == done                 # acknowledged as ingested
    await a.close()
    await b.close()
    await c.stop()
    return at_b, done


def test_a_backlog_of_reports_does_not_hold_a_new_stream() -> None:
    at_b, done = asyncio.run(backlog_then_connect(5.0))
    assert done == REPORTS                      # every report ingested, in the end
    assert at_b < REPORTS                       # B was answered while A's reports were still queued


def test_inline_ingest_holds_a_new_stream_behind_the_backlog() -> None:
    """The old behaviour (ingest_turn_ms 0): what the queue is for."""
    at_b, done = asyncio.run(backlog_then_connect(0))
    assert done == at_b == REPORTS


def test_ingest_turn_flag() -> None:
    base = ["--state-dir", "/nonexistent"]
    assert parse_args(base).ingest_turn_ms == ControllerConfig.ingest_turn_ms > 0
    assert parse_args([*base, "--ingest-turn-ms", "0"]).ingest_turn_ms == 0

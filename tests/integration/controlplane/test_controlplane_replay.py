"""Issue 12 item 3 over loopback (no root): the real agent telemetry (a worker over a real
workerlink, the parent's NodeTelemetry and ControllerLink) reports to the real controller over
real grpc.aio; the controller goes away and comes back, and its windows hold exactly what the
worker counted, each count in the second it was counted.

* a controller restart (a new process: empty memory, a new epoch): the agent's whole history is
  replayed, including what the dead controller had already acknowledged and what was counted while
  no controller ran;
* a stream broken to the *same* controller: only what it lacks is sent again, and nothing it had
  is counted twice;
* a controller from before increments (its first message is the identity, not a ReportAck) is
  tests/integration/agent/test_agent_report_controller.py: cumulative reports, as before.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from agent_telemetry import count_requests, loopback_agent_config, start_agent
from controller_link import config_for, run
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.controlplane.main import RunningController, start
from nodemesh.controlplane.server import start_grpc_server
from waiting import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counted:
    """Requests made through the worker's Observer, with the second each was counted in."""

    def __init__(self, worker: WorkerTelemetry) -> None:
        self.worker = worker
        self.batches: list[tuple[float, int]] = []  # (time, requests)
        self._conn = 0

    def requests(self, n: int) -> None:
        self._conn += 1
        count_requests(self.worker, n, self._conn, status=lambda i: 200 if i % 5 else 503)
        self.batches.append((time.time(), n))

    @property
    def total(self) -> int:
        return sum(n for _, n in self.batches)


def responses(running: RunningController, window_s: int = 600) -> float:
    """Every response the controller holds (the second in progress too)."""
    return running.controller.aggregator.totals(window_s, now=time.time() + 2).responses


def assert_filed_when_counted(running: RunningController, counted: Counted) -> None:
    """Each batch lies in the buckets of the seconds around when it was counted (the worker hands
    its counts over within a report interval, the parent closes its interval within another)."""
    agg = running.controller.aggregator
    for when, n in counted.batches:
        near = agg.totals(4, now=int(when) + 3).responses  # seconds [when-1, when+3)
        assert near >= n, f"batch of {n} at {when:.1f} not filed near then: {near}"


async def agent(port: int) -> tuple[NodeTelemetry, WorkerTelemetry]:
    return await start_agent(loopback_agent_config(port, watch_capture=False))


def test_controller_restart_gets_the_whole_history_back(state_dir: Path) -> None:
    async def body() -> None:
        port = free_port()
        running: RunningController | None = await start(config_for(state_dir, port))
        node, worker = await agent(port)
        counted = Counted(worker)
        try:
            link = node.controller_link
            await eventually(lambda: link.connected and link.mode == "increments", what="increments mode")
            first_epoch = link.controller_epoch
            for _ in range(4):
                counted.requests(25)
                await asyncio.sleep(0.6)
            await eventually(lambda: responses(running) == counted.total, what="counted before the restart")
            acked_before = link.ring.acked
            assert acked_before > 0

            # The controller dies (its memory with it) while traffic goes on; it is away ~3 s.
            await running.stop()
            running = None
            await eventually(lambda: not link.connected, what="disconnect noticed")
            t_down = time.time()
            for _ in range(4):
                counted.requests(10)
                await asyncio.sleep(0.7)
            running = await start(config_for(state_dir, port))
            t_back = time.time()
            await eventually(lambda: link.connected and link.controller_epoch not in (0, first_epoch),
                             what="reconnected to the new controller")
            counted.requests(7)
            # Everything: what the old controller had acknowledged, the downtime, and after.
            await eventually(lambda: responses(running) >= counted.total, what="the whole history")
            await asyncio.sleep(1.0)  # late duplicates would show up now
            assert responses(running) == counted.total
            totals = running.controller.aggregator.totals(600, now=time.time() + 2)
            assert totals.failure == sum(len(range(0, n, 5)) for _, n in counted.batches)  # i % 5 == 0: 503
            assert totals.requests == counted.total
            assert sum(totals.latency) == counted.total
            assert_filed_when_counted(running, counted)
            # Nothing of the downtime went into the second of the reconnect.
            during = [n for when, n in counted.batches if t_down <= when < t_back - 1]
            assert during and running.controller.aggregator.totals(1, now=int(t_back) + 1).responses \
                < sum(during)
            assert link.replayed >= 1 and link.ring.dropped_unacked == 0
            m = running.controller.metrics
            assert m.reports_replayed._value.get() >= 1 and m.reports_duplicate._value.get() == 0
            print(f"\nrestart: counted {counted.total}, controller holds {responses(running):.0f}; "
                  f"replayed {link.replayed} intervals, ring {len(link.ring)} entries {link.ring.bytes} bytes")
        finally:
            await worker.stop()
            await node.stop()
            if running is not None:
                await running.stop()

    run(body, timeout=90)


def test_reconnect_to_the_same_controller_sends_only_what_it_lacks(state_dir: Path) -> None:
    async def body() -> None:
        port = free_port()
        running = await start(config_for(state_dir, port))
        node, worker = await agent(port)
        counted = Counted(worker)
        server = running.grpc_server
        try:
            link = node.controller_link
            await eventually(lambda: link.connected and link.mode == "increments", what="increments mode")
            counted.requests(30)
            await eventually(lambda: responses(running) == 30, what="30 counted")
            # The stream breaks (the controller process lives on, with its memory): the gRPC
            # server goes and comes back on the same port, in front of the same Controller.
            await server.stop(0)
            await eventually(lambda: not link.connected, what="disconnect noticed")
            counted.requests(12)
            await asyncio.sleep(1.0)
            server, _ = await start_grpc_server(running.controller, "127.0.0.1", port)
            await eventually(lambda: link.connected and link.mode == "increments", what="reconnected")
            await eventually(lambda: responses(running) >= 42, what="42 counted")
            await asyncio.sleep(1.0)
            assert responses(running) == 42
            assert_filed_when_counted(running, counted)
            counters = running.controller._counters[node.agent_id][0]
            assert counters.duplicates == 0 and counters.gaps == 0
            # Only the intervals after the controller's ack were sent again, not the whole ring.
            assert 0 < link.replayed < len(link.ring)
        finally:
            await worker.stop()
            await node.stop()
            await server.stop(0)
            running.grpc_server = server
            await running.stop()

    run(body, timeout=90)

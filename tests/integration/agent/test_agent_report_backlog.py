"""A controller that stays connected but stops reading (stuck, or far too slow) must not grow the
agent's memory: the outbox holds at most a few reports, the intervals after that wait in the
history ring (bounded by age and bytes), and once the controller reads again it gets every interval
exactly once, oldest first (loopback, real grpc.aio, no root).

The test controller's receive window is made tiny (no BDP probing, 1 KiB lookahead) so that gRPC's
flow control parks the agent's request iterator after a few reports, as a busy controller's full
window does with real report sizes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
from agent_telemetry import count_requests, loopback_agent_config, start_agent
from nodemesh.agent import report as report_mod
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc

INTERVAL_S = 0.05


class StuckController(pb_grpc.ControllerServicer):
    """Acks (takes increments, holds nothing), then reads nothing until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reports: list[pb.MetricsReport] = []
        self.sessions = 0

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControllerMessage]:
        self.sessions += 1
        yield pb.ControllerMessage(report_ack=pb.ReportAck(seq=0, controller_epoch=7))
        await self.release.wait()
        async for msg in request_iterator:
            if msg.WhichOneof("msg") == "metrics":
                self.reports.append(msg.metrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_controller_that_stops_reading_costs_the_agent_a_bounded_outbox() -> None:
    async def body() -> None:
        port = free_port()
        controller = StuckController()
        server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        pb_grpc.add_ControllerServicer_to_server(controller, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        node, worker = await start_agent(loopback_agent_config(port, INTERVAL_S, watch_capture=False))
        link = node.controller_link
        assert link is not None
        try:
            deadline = time.monotonic() + 15
            while not (link.connected and link.mode == "increments"):
                assert time.monotonic() < deadline, "never took increments"
                await asyncio.sleep(0.02)
            # 60 intervals with counts in them while the controller reads nothing: without the
            # bound the outbox would hold ~60 reports and ~60 statuses.
            peak = 0
            for i in range(60):
                count_requests(worker, 3, i + 1)
                await asyncio.sleep(INTERVAL_S)
                peak = max(peak, link.reports_queued)
            assert link.reports_held_back > 0, "the window never filled: the test proves nothing"
            assert peak <= report_mod._REPORTS_QUEUED_MAX, peak
            assert link._outbox is not None and link._outbox.qsize() <= 3 * report_mod._REPORTS_QUEUED_MAX
            held = link.reports_held_back
            controller.release.set()
            # Every interval arrives once, in order, and the counts add up.
            want = 60 * 3
            deadline = time.monotonic() + 20
            while sum(s.value for r in controller.reports for s in r.series if s.name == "response_total") < want:
                assert time.monotonic() < deadline, f"got {len(controller.reports)} reports"
                await asyncio.sleep(0.05)
            await asyncio.sleep(4 * INTERVAL_S)
            seqs = [r.seq for r in controller.reports]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), seqs
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "an interval is missing"
            got = sum(s.value for r in controller.reports for s in r.series if s.name == "response_total")
            assert got == want, (got, want)
            assert controller.sessions == 1  # caught up on the same stream, no reconnect
            assert link.ring.dropped_unacked == 0
            print(f"\nbacklog: peak queued {peak} reports, {held} intervals held back in the ring, "
                  f"{len(seqs)} reports delivered after release")
        finally:
            await worker.stop()
            await node.stop()
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 90))

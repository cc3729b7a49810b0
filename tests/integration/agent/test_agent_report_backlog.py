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
from nodemesh.agent import report as report_mod
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.agent.workerlink import make_channel
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc

WEB, VOTING = "10.244.1.5", "10.244.2.7"
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


def count(worker: WorkerTelemetry, n: int, conn_id: int) -> None:
    meta = ConnectionMeta(conn_id, "outbound", (WEB, 40000 + conn_id), (VOTING, 8080), (VOTING, 8080), "http1",
                          started=time.monotonic())
    c = worker.connection_open(meta)
    for i in range(n):
        t0 = time.monotonic()
        r = worker.request_start(c, RequestHead("GET", "http", "voting:8080", f"/v/{i}", stream_id=i + 1, started=t0))
        worker.response_start(r, 200, [], t0 + 0.001)
        worker.request_end(r, RequestEnd(response_bytes=3, ended=t0 + 0.002))
    worker.connection_close(c, ConnectionEnd(read_bytes=10, write_bytes=5, ended=time.monotonic()))


def test_a_controller_that_stops_reading_costs_the_agent_a_bounded_outbox() -> None:
    async def body() -> None:
        port = free_port()
        controller = StuckController()
        server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        pb_grpc.add_ControllerServicer_to_server(controller, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        cfg = AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, controller=f"127.0.0.1:{port}",
                          report_interval_s=INTERVAL_S, workers=1, watch_capture=False)
        node = NodeTelemetry(cfg)
        parent_end, child_end = make_channel()
        worker = WorkerTelemetry(cfg, child_end, worker_index=0)
        await node.start()
        node.attach_worker(0, parent_end)
        await worker.start()
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
                count(worker, 3, i + 1)
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

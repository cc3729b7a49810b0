"""The agent's controller link against a real grpc.aio Controller.Connect server (loopback, no root).

A WorkerTelemetry (over a real workerlink socketpair) counts requests; NodeTelemetry merges and
reports them. The test controller records what arrives, pushes identity and tap commands, and is
killed and restarted: the agent reconnects, the same agent_id carries cumulative counts that never
go backwards, and nothing the worker counted while the controller was down is lost.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from agent_telemetry import count_requests
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.agent.workerlink import make_channel
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from waiting import eventually

WEB, VOTING = "10.244.1.5", "10.244.2.7"


class FakeController(pb_grpc.ControllerServicer):
    """Just enough of the controller's Connect: records, pushes identity, relays tap commands."""

    def __init__(self) -> None:
        self.messages: list[pb.AgentMessage] = []
        self.metadata: list[dict[str, str]] = []
        self.down: asyncio.Queue[pb.ControllerMessage] = asyncio.Queue()
        self.sessions = 0

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControllerMessage]:
        self.sessions += 1
        self.metadata.append(dict(context.invocation_metadata() or ()))

        async def read() -> None:
            async for msg in request_iterator:
                self.messages.append(msg)

        reader = asyncio.get_running_loop().create_task(read())
        yield pb.ControllerMessage(identity=identity())
        try:
            while not reader.done():
                try:
                    yield await asyncio.wait_for(self.down.get(), 0.05)
                except TimeoutError:
                    pass
        finally:
            reader.cancel()

    def of(self, kind: str) -> list[pb.AgentMessage]:
        return [m for m in self.messages if m.WhichOneof("msg") == kind]

    def request_totals(self) -> list[tuple[str, int, float]]:
        """(agent_id, seq, total request_total) for every MetricsReport, in arrival order."""
        return [(m.metrics.agent_id, m.metrics.seq,
                 sum(s.value for s in m.metrics.series if s.name == "request_total"))
                for m in self.of("metrics")]


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot(resource_version="3")
    for ip, name, node in ((WEB, "web", "node-1"), (VOTING, "voting", "node-2")):
        snap.pods.append(pb.Pod(ip=ip, namespace="emojivoto", name=f"{name}-abc", node=node, ready=True,
                                owner=pb.Resource(namespace="emojivoto", type="deployment", name=name)))
    return snap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(ctl: FakeController, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_ControllerServicer_to_server(ctl, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def do_requests(tel: WorkerTelemetry, n: int, conn_id: int) -> None:
    count_requests(tel, n, conn_id, status=lambda i: 200 if i % 4 else 500, read_bytes=100 * n, write_bytes=50 * n)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


def test_report_reconnect_monotonic_and_tap(tmp_path: Path) -> None:
    async def body() -> None:
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        port = free_port()
        ctl = FakeController()
        server: grpc.aio.Server | None = await start_server(ctl, port)
        cfg = AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, controller=f"127.0.0.1:{port}",
                          token_file=str(token), report_interval_s=0.1, workers=1)
        node = NodeTelemetry(cfg)
        parent_end, child_end = make_channel()
        worker = WorkerTelemetry(cfg, child_end, worker_index=0)
        try:
            await node.start()
            node.attach_worker(0, parent_end)
            await worker.start()
            # Identity flows controller -> node -> worker.
            await eventually(lambda: worker.index.owner(VOTING) is not None, what="identity at the worker")
            assert worker.index.peer_labels(VOTING)[2] == "voting"
            hello = ctl.of("hello")[0].hello
            assert hello.node == "node-1" and hello.agent_id == node.agent_id
            assert hello.agent_id.startswith("node-1/") and hello.start_time_ms == node.start_time_ms
            assert ctl.metadata[0].get("authorization") == "Bearer s3cret"

            do_requests(worker, 12, conn_id=1)
            await eventually(lambda: ctl.request_totals() and ctl.request_totals()[-1][2] == 12, what="12 reported")
            last = ctl.of("metrics")[-1].metrics
            assert list(last.latency_bounds_ms)[:3] == [1.0, 2.0, 3.0]
            failures = sum(s.value for s in last.series if s.name == "response_total"
                           and s.labels["classification"] == "failure")
            assert failures == 3
            lat = [s for s in last.series if s.name == "response_latency_ms"]
            assert sum(sum(s.bucket_counts) for s in lat) == 12
            status = ctl.of("status")[-1].status
            assert status.ready is False and abs(status.time_ms - time.time() * 1000) < 5000
            node.set_ready(True)
            await eventually(lambda: ctl.of("status")[-1].status.ready, what="ready status")

            # Controller dies: traffic keeps being counted; nothing waits.
            await server.stop(0)
            server = None
            await eventually(lambda: node.controller_link.connected is False, what="disconnect noticed")
            t0 = time.monotonic()
            do_requests(worker, 8, conn_id=2)
            assert time.monotonic() - t0 < 0.5
            await asyncio.sleep(0.5)
            server = await start_server(ctl, port)
            await eventually(lambda: ctl.sessions == 2, what="reconnect")
            await eventually(lambda: ctl.request_totals()[-1][2] == 20, what="20 reported after reconnect")
            hellos = ctl.of("hello")
            assert len(hellos) == 2 and hellos[1].hello.agent_id == node.agent_id  # same process, same id
            totals = ctl.request_totals()
            assert all(a == node.agent_id for a, _, _ in totals)
            assert [t for _, _, t in totals] == sorted(t for _, _, t in totals), "counts went backwards"
            assert [s for _, s, _ in totals] == sorted({s for _, s, _ in totals}), "seq not increasing"

            # Tap: open -> events arrive; close -> they stop.
            # node-1 runs web: the tap shows web's own (outbound) calls to voting (agent/tap.py).
            flt = pb.TapFilter(target=pb.Resource(namespace="emojivoto", type="deployment", name="web"),
                               max_rps=1000)
            await ctl.down.put(pb.ControllerMessage(tap_open=pb.TapOpen(tap_id="tap-9", filter=flt)))
            await eventually(lambda: bool(worker.taps.taps), what="tap open at the worker")
            do_requests(worker, 4, conn_id=3)
            await eventually(lambda: len(ctl.of("tap_event")) == 12, what="12 tap events")
            evs = [m.tap_event for m in ctl.of("tap_event")]
            assert {e.tap_id for e in evs} == {"tap-9"}
            assert [e.WhichOneof("event") for e in evs[:3]] == ["request_init", "response_init", "response_end"]
            assert evs[0].request_id == "3:1"  # worker 0: no prefix and evs[0].destination.owner.name == "voting"
            await ctl.down.put(pb.ControllerMessage(tap_close=pb.TapClose(tap_id="tap-9")))
            await eventually(lambda: not worker.taps.taps, what="tap closed at the worker")
            do_requests(worker, 4, conn_id=4)
            await eventually(lambda: ctl.request_totals()[-1][2] == 28, what="28 reported")
            assert len(ctl.of("tap_event")) == 12
        finally:
            await worker.stop()
            await node.stop()
            if server is not None:
                await server.stop(0)

    run(body)


def test_controller_down_from_the_start_counts_accumulate() -> None:
    async def body() -> None:
        port = free_port()  # nobody listens here yet
        cfg = AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, controller=f"127.0.0.1:{port}",
                          report_interval_s=0.1, workers=1)
        node = NodeTelemetry(cfg)
        parent_end, child_end = make_channel()
        worker = WorkerTelemetry(cfg, child_end)
        ctl = FakeController()
        server: grpc.aio.Server | None = None
        try:
            await node.start()
            node.attach_worker(0, parent_end)
            await worker.start()
            do_requests(worker, 7, conn_id=1)
            await eventually(lambda: sum(node.snapshot()["request_total"].values()) == 7, what="merged at node")
            await asyncio.sleep(0.6)  # several failed connection attempts
            server = await start_server(ctl, port)
            await eventually(lambda: bool(ctl.request_totals()) and ctl.request_totals()[-1][2] == 7,
                           timeout=15, what="first report after the controller appears")
            assert ctl.of("hello")[0].hello.agent_id == node.agent_id
        finally:
            await worker.stop()
            await node.stop()
            if server is not None:
                await server.stop(0)

    run(body)


def test_agent_restart_gets_new_agent_id() -> None:
    a = NodeTelemetry(AgentConfig(node="n", workers=1))
    time.sleep(0.002)
    b = NodeTelemetry(AgentConfig(node="n", workers=1))
    assert a.agent_id != b.agent_id and a.agent_id.split("/")[:2] == b.agent_id.split("/")[:2]


class BigIdentityController(FakeController):
    """Sends one identity snapshot larger than gRPC's 4 MiB default message limit."""

    PODS = 60_000

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControllerMessage]:
        snap = identity()
        for i in range(self.PODS):
            snap.pods.append(pb.Pod(ip=f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}", namespace="big",
                                    name=f"pod-{i:05d}-abcdefghij", node=f"node-{i % 50}", ready=True,
                                    owner=pb.Resource(namespace="big", type="deployment", name=f"d-{i % 500}")))
        assert snap.ByteSize() > 4 * 1024 * 1024
        yield pb.ControllerMessage(identity=snap)
        async for _ in request_iterator:
            pass


def test_report_accepts_an_identity_snapshot_over_4mib() -> None:
    """A big cluster's identity (every pod) must not break the agent's stream (api/model.py limit)."""
    async def body() -> None:
        port = free_port()
        ctl = BigIdentityController()
        server = await start_server(ctl, port)
        cfg = AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, controller=f"127.0.0.1:{port}",
                          report_interval_s=0.1, workers=1)
        node = NodeTelemetry(cfg)
        try:
            await node.start()
            await eventually(lambda: node.index.owner("10.100.195.79") is not None, timeout=30,
                           what="the big identity at the agent")
            assert node.controller_link.connects == 1
        finally:
            await node.stop()
            await server.stop(None)

    run(body)

"""A controller on loopback fed by fake agents over real gRPC, for the dashboard's tests.

`ControllerThread` runs the real controller (`nodemesh.controlplane.main.start`: SandboxSource,
gRPC API, web app with the dashboard) on its own asyncio loop in a thread, so synchronous code —
Playwright's sync API, plain HTTP clients — can drive it while `FakeAgent`s (real gRPC clients
speaking the agent's side of Controller.Connect) feed it cumulative metric reports and tap events.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import controller_feed
from controller_feed import NS, PODS, series_for
from controller_feed import peer as peer_labels
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.main import RunningController, start
from waiting import eventually

TESTDATA = Path(__file__).resolve().parents[1] / "unit" / "dashboard" / "testdata" / "cluster.json"
IPS = {"web": "10.244.1.5", "emoji": "10.244.1.6", "voting": "10.244.2.8", "vote-bot": "10.244.1.9"}
NODE_OF = {"web": "node-1", "emoji": "node-1", "voting": "node-2", "vote-bot": "node-1"}
SERVICE_OF = {"web": "web-svc", "emoji": "emoji-svc", "voting": "voting-svc"}
# (caller, callee, successes per report, failures per report, latency bucket upper bound in ms)
TRAFFIC = (("vote-bot", "web", 10, 0, 5.0), ("web", "emoji", 18, 2, 20.0), ("web", "voting", 8, 2, 100.0))
T = TypeVar("T")


def traffic_report(node: str, agent_id: str, seq: int) -> pb.AgentMessage:
    """The agent on `node`'s cumulative counters after `seq` reports of TRAFFIC: outbound on the
    caller's node, inbound on the callee's (both from one agent when they share a node)."""
    out: list[pb.Series] = []
    for src, dst, ok, bad, bound in TRAFFIC:
        for direction, who in (("outbound", src), ("inbound", dst)):
            if NODE_OF[who] == node:
                out += series_for(peer_labels(direction, src, dst, SERVICE_OF[dst], "http1"), ok * seq, bad * seq, bound,
                                  open_connections=1, read_bytes=None)
    return pb.AgentMessage(metrics=pb.MetricsReport(agent_id=agent_id, seq=seq, time_ms=int(time.time() * 1000),
                                                    series=out))


def peer(name: str, port: int = 0) -> pb.Peer:
    return pb.Peer(ip=IPS[name], port=port, namespace=NS, pod=PODS[name],
                   owner=pb.Resource(namespace=NS, type="deployment", name=name))


def tap_request(tap_id: str, request_id: str, path: str, status: int = 200, method: str = "GET",
                src: str = "vote-bot", dst: str = "web", grpc_status: int | None = None,
                latency_us: int = 1500) -> list[pb.AgentMessage]:
    """One tapped request as an agent sends it: request_init, response_init, response_end."""
    base = {"tap_id": tap_id, "request_id": request_id, "direction": "inbound", "node": NODE_OF[dst],
                "source": peer(src, 40000), "destination": peer(dst, 8080)}
    now = int(time.time() * 1000)
    end = pb.ResponseEnd(since_request_init_us=latency_us + 300, response_bytes=42)
    if grpc_status is not None:
        end.has_grpc_status, end.grpc_status = True, grpc_status
    return [
        pb.AgentMessage(tap_event=pb.TapEvent(**base, time_ms=now, request_init=pb.RequestInit(
            method=method, scheme="http", authority=f"{SERVICE_OF[dst]}.{NS}:8080", path=path))),
        pb.AgentMessage(tap_event=pb.TapEvent(**base, time_ms=now, response_init=pb.ResponseInit(
            http_status=status, since_request_init_us=latency_us))),
        pb.AgentMessage(tap_event=pb.TapEvent(**base, time_ms=now, response_end=end)),
    ]


class FakeAgent(controller_feed.FakeAgent):
    """A fake agent (tests/support/controller_feed.py) that reports TRAFFIC and lists its open taps."""

    def __init__(self, port: int, agent_id: str, node: str, ready: bool = True) -> None:
        super().__init__(port, agent_id, node, ready=ready)
        self.seq = 0

    def report_traffic(self) -> None:
        self.seq += 1
        self.send(traffic_report(self.node, self.agent_id, self.seq))

    def open_taps(self) -> list[str]:
        closed = {c.tap_id for c in self.of("tap_close")}
        return [o.tap_id for o in self.of("tap_open") if o.tap_id not in closed]


def write_cluster(state_dir: Path) -> None:
    write_objects(state_dir, ClusterObjects(1, json.loads(TESTDATA.read_text())["items"]))


class ControllerThread:
    """The real controller and two fake agents on a private event loop in a daemon thread."""

    def __init__(self, state_dir: Path, **config: Any) -> None:
        write_cluster(state_dir)
        self.config = ControllerConfig(source="sandbox", state_dir=str(state_dir), grpc_port=0, web_port=0,
                                       identity_debounce_s=0.05, sandbox_poll_s=0.1, **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dashboard-controller", daemon=True)
        self.thread.start()
        self.running: RunningController | None = None
        self.agents: dict[str, FakeAgent] = {}

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.call(wrapper())

    def start(self) -> ControllerThread:
        async def go() -> None:
            self.running = await start(self.config)
            for node, ready in (("node-1", True), ("node-2", True)):
                self.agents[node] = FakeAgent(self.running.grpc_port, f"agent-{node}", node, ready)
            await eventually(lambda: len(self.running.controller.sessions) == 2  # type: ignore[union-attr]
                           and self.running.controller.ready)  # type: ignore[union-attr]
        self.call(go())
        return self

    @property
    def base_url(self) -> str:
        assert self.running is not None
        return f"http://127.0.0.1:{self.running.web_port}"

    @property
    def grpc_address(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.grpc_port}"

    def report_traffic(self, rounds: int = 1) -> None:
        """Every agent reports `rounds` more rounds of TRAFFIC; returns once all are ingested and the
        second they landed in is over (stats count complete seconds only)."""
        async def go() -> None:
            c = self.running.controller  # type: ignore[union-attr]
            for _ in range(rounds):
                for a in self.agents.values():
                    a.report_traffic()
            await eventually(lambda: all(c.sessions[a.agent_id].reports >= a.seq for a in self.agents.values()))
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
        self.call(go())

    def wait_tap_open(self, node: str, timeout: float = 10.0) -> str:
        agent = self.agents[node]

        async def go() -> str:
            await eventually(lambda: bool(agent.open_taps()), timeout)
            return agent.open_taps()[-1]
        return self.call(go(), timeout + 5)

    def send(self, node: str, messages: list[pb.AgentMessage]) -> None:
        agent = self.agents[node]
        self.run(lambda: [agent.send(m) for m in messages])

    def stop(self) -> None:
        async def go() -> None:
            for a in self.agents.values():
                await a.close()
            if self.running is not None:
                await self.running.stop()
        try:
            self.call(go())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

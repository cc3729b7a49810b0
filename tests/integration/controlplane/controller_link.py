"""What the controller's loopback tests share: a real controller (`config_for`: the sandbox source
over a recorded cluster, see the `state_dir` fixture in conftest.py), fake agents that are real
gRPC clients of Controller.Connect (`FakeAgent`), their report labels, and waiting helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.main import RunningController

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
NS = "emojivoto"
EMOJI_POD = "emoji-6b8f4c7d9-k8s7p"


def labels(direction: str = "inbound") -> dict[str, str]:
    return {"direction": direction, "src_namespace": NS, "src_kind": "deployment", "src_name": "web",
            "src_pod": "web-5f7c9d8b6-x2vqm", "dst_namespace": NS, "dst_kind": "deployment", "dst_name": "emoji",
            "dst_pod": EMOJI_POD, "dst_service": f"emoji-svc.{NS}", "authority": "emoji-svc:8080",
            "protocol": "http2"}


def report(agent_id: str, seq: int, success: float, failure: float = 0) -> pb.AgentMessage:
    base = labels()
    return pb.AgentMessage(metrics=pb.MetricsReport(agent_id=agent_id, seq=seq, time_ms=int(time.time() * 1000),
                                                    series=[
        pb.Series(name="response_total", labels={**base, "classification": "success"}, value=success),
        pb.Series(name="response_total", labels={**base, "classification": "failure"}, value=failure),
    ]))


class FakeAgent:
    """A real gRPC client speaking the agent's side of Controller.Connect."""

    def __init__(self, port: int, agent_id: str, node: str, start_time_ms: int) -> None:
        self.agent_id, self.node = agent_id, node
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ControllerStub(self.channel)
        self.outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.received: list[pb.ControllerMessage] = []
        self.outbox.put_nowait(pb.AgentMessage(hello=pb.AgentHello(
            agent_id=agent_id, node=node, version="0.1.0", start_time_ms=start_time_ms)))
        self.outbox.put_nowait(pb.AgentMessage(status=pb.AgentStatus(
            ready=True, capture_installed=True, time_ms=int(time.time() * 1000))))
        self.call = self.stub.Connect(self._messages())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[pb.AgentMessage]:
        while True:
            msg = await self.outbox.get()
            if msg is None:
                return
            yield msg

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.received.append(msg)
        except grpc.aio.AioRpcError:
            pass

    def send(self, msg: pb.AgentMessage) -> None:
        self.outbox.put_nowait(msg)

    def of(self, which: str) -> list[Any]:
        return [getattr(m, which) for m in self.received if m.WhichOneof("msg") == which]

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


async def eventually(cond: Callable[[], bool], timeout: float = 15.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def reports_from(running: RunningController | None, agent_id: str) -> int:
    session = running.controller.sessions.get(agent_id) if running else None
    return session.reports if session else -1


def write_cluster(state_dir: Path, items: list[dict[str, Any]], rv: int) -> None:
    write_objects(state_dir, ClusterObjects(rv, items))


def config_for(state_dir: Path, grpc_port: int = 0) -> ControllerConfig:
    return ControllerConfig(source="sandbox", state_dir=str(state_dir), grpc_port=grpc_port, web_port=0,
                            identity_debounce_s=0.05, sandbox_poll_s=0.1)


def run(coro_fn: Callable[[], Any], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout))

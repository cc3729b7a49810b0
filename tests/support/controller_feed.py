"""Synthetic agents for the controller's and the dashboard's tests: the emojivoto pods of the
recorded cluster (`testdata/cluster.json` beside those tests), the labels and series of their
reports, the registry of a recorded cluster, and a fake agent that is a real gRPC client of
Controller.Connect."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry

NS = "emojivoto"
PODS = {"web": "web-5f7c9d8b6-x2vqm", "emoji": "emoji-6b8f4c7d9-k8s7p", "voting": "voting-74d9c8f6b5-h6wnb",
        "vote-bot": "vote-bot-7c4d8b5f9-p2lkd"}


def peer(direction: str, src: str, dst: str, service: str, protocol: str = "http2") -> dict[str, str]:
    """The labels of a series one deployment's pod sent another's, through `service`."""
    return {"direction": direction, "src_namespace": NS, "src_kind": "deployment", "src_name": src,
            "src_pod": PODS[src], "dst_namespace": NS, "dst_kind": "deployment", "dst_name": dst,
            "dst_pod": PODS[dst], "dst_service": f"{service}.{NS}", "authority": f"{service}.{NS}:8080",
            "protocol": protocol}


def series_for(labels: dict[str, str], success: int, failure: int, bound_ms: float, *, status_codes: bool = True,
               open_connections: int = 2, read_bytes: int | None = 6000) -> list[pb.Series]:
    """Cumulative series of `success` + `failure` requests, every one in the latency bucket ending at
    `bound_ms`; responses with (200/500) or without a status code label."""
    counts = [0] * N_LATENCY
    counts[BOUNDS.index(bound_ms)] = success + failure
    ok, bad = ({"status_code": "200"}, {"status_code": "500"}) if status_codes else ({}, {})
    series = [
        pb.Series(name="request_total", labels=labels, value=success + failure),
        pb.Series(name="response_total", labels={**labels, "classification": "success", **ok}, value=success),
        pb.Series(name="response_total", labels={**labels, "classification": "failure", **bad}, value=failure),
        pb.Series(name="response_latency_ms", labels=labels, bucket_counts=counts, sum=0.0),
        pb.Series(name="tcp_open_connections", labels=labels, value=open_connections),
    ]
    if read_bytes is not None:
        series.append(pb.Series(name="tcp_read_bytes_total", labels=labels, value=read_bytes))
    return series


def recorded_registry(path: Path) -> WorkloadRegistry:
    """The workload registry of a recorded cluster (a `{"items": [...]}` file)."""
    objects = json.loads(path.read_text())["items"]
    reg = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    return reg


class FakeAgent:
    """A real gRPC client speaking the agent's side of Controller.Connect: hello and status first
    (started a second after now unless told), then whatever the test sends; keeps what it receives."""

    def __init__(self, port: int, agent_id: str, node: str, start_time_ms: int | None = None,
                 ready: bool = True) -> None:
        self.agent_id, self.node = agent_id, node
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ControllerStub(self.channel)
        self.outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.received: list[pb.ControllerMessage] = []
        start = start_time_ms if start_time_ms is not None else int(time.time() * 1000) + 1000
        self.send(pb.AgentMessage(hello=pb.AgentHello(agent_id=agent_id, node=node, version="0.1.0",
                                                      start_time_ms=start)))
        self.send(pb.AgentMessage(status=pb.AgentStatus(ready=ready, capture_installed=ready,
                                                        time_ms=int(time.time() * 1000))))
        self.call = self.stub.Connect(self._messages())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[pb.AgentMessage]:
        while (msg := await self.outbox.get()) is not None:
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

"""What the controller's unit tests share: a synthetic emojivoto cluster's agent reports (`peer`,
`series_for`; the `controller` fixture in conftest.py holds them), a StatSummary request helper,
and one agent stream into Controller.serve_agent without gRPC (`Stream`, `settle`)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY
from nodemesh.controlplane.controller import Controller

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
NS = "emojivoto"
PODS = {
    "web": "web-5f7c9d8b6-x2vqm", "emoji": "emoji-6b8f4c7d9-k8s7p", "voting": "voting-74d9c8f6b5-h6wnb",
    "vote-bot": "vote-bot-7c4d8b5f9-p2lkd",
}


def peer(direction: str, src: str, dst: str, service: str) -> dict[str, str]:
    return {"direction": direction, "src_namespace": NS, "src_kind": "deployment", "src_name": src,
            "src_pod": PODS[src], "dst_namespace": NS, "dst_kind": "deployment", "dst_name": dst,
            "dst_pod": PODS[dst], "dst_service": f"{service}.{NS}", "authority": f"{service}.{NS}:8080",
            "protocol": "http2"}


def series_for(labels: dict[str, str], success: int, failure: int, bound_ms: float) -> list[pb.Series]:
    counts = [0] * N_LATENCY
    counts[BOUNDS.index(bound_ms)] = success + failure
    return [
        pb.Series(name="request_total", labels=labels, value=success + failure),
        pb.Series(name="response_total", labels={**labels, "classification": "success", "status_code": "200"},
                  value=success),
        pb.Series(name="response_total", labels={**labels, "classification": "failure", "status_code": "500"},
                  value=failure),
        pb.Series(name="response_latency_ms", labels=labels, bucket_counts=counts, sum=0.0),
        pb.Series(name="tcp_open_connections", labels=labels, value=2),
        pb.Series(name="tcp_read_bytes_total", labels=labels, value=6000),
    ]


def stat(c: Controller, type_: str, name: str = "", *, frm: tuple[str, str] | None = None,
         to: tuple[str, str] | None = None, window: int = 60, ns: str = NS, all_ns: bool = False,
         labels: str = "") -> pb.StatResponse:
    req = pb.StatRequest(selector=pb.Resource(namespace=ns, type=type_, name=name), window_seconds=window,
                         all_namespaces=all_ns, label_selector=labels)
    if frm:
        getattr(req, "from").CopyFrom(pb.Resource(namespace=NS, type=frm[0], name=frm[1]))
    if to:
        req.to.CopyFrom(pb.Resource(namespace=NS, type=to[0], name=to[1]))
    return c.stat(req)


class Stream:
    """One agent stream into Controller.serve_agent (no gRPC: the servicer is a thin layer)."""

    def __init__(self, controller: Controller, agent_id: str = "node-1/7/1") -> None:
        self.inbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.received: list[pb.ControllerMessage] = []
        self.inbox.put_nowait(pb.AgentMessage(hello=pb.AgentHello(agent_id=agent_id, node="node-1",
                                                                  start_time_ms=1)))
        self.task = asyncio.create_task(self._pump(controller.serve_agent(self._messages())))

    async def _messages(self):  # type: ignore[no-untyped-def]
        while (msg := await self.inbox.get()) is not None:
            yield msg

    async def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        async for msg in stream:
            self.received.append(msg)

    def send(self, report: pb.MetricsReport) -> None:
        self.inbox.put_nowait(pb.AgentMessage(metrics=report))

    def acks(self) -> list[int]:
        return [m.report_ack.seq for m in self.received if m.HasField("report_ack")]

    async def close(self) -> None:
        self.inbox.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 2)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.005)

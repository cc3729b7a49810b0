"""What the controller's unit tests share: the recorded cluster (`TESTDATA`; the synthetic agents'
reports, tests/support/controller_feed.py, fill the `controller` fixture in conftest.py), a
StatSummary request helper, and one agent stream into Controller.serve_agent without gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from controller_feed import NS
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.controller import Controller

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
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

"""The agent's real telemetry in process, for tests of its controller link: a NodeTelemetry (the
parent, which reports) with one WorkerTelemetry attached over a real workerlink socketpair, and
requests counted through the worker's Observer as the relay counts them."""

from __future__ import annotations

import time
from collections.abc import Callable

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.agent.workerlink import make_channel

WEB, VOTING = "10.244.1.5", "10.244.2.7"


async def start_agent(cfg: AgentConfig) -> tuple[NodeTelemetry, WorkerTelemetry]:
    """The parent and its one worker, started and linked (stop the worker, then the node)."""
    node = NodeTelemetry(cfg)
    parent_end, child_end = make_channel()
    worker = WorkerTelemetry(cfg, child_end, worker_index=0)
    await node.start()
    node.attach_worker(0, parent_end)
    await worker.start()
    return node, worker


def loopback_agent_config(port: int, report_interval_s: float = 0.2, **kw: object) -> AgentConfig:
    """An agent reporting to a controller at 127.0.0.1:`port`, admin on a free port, no capture."""
    return AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, controller=f"127.0.0.1:{port}",
                       report_interval_s=report_interval_s, workers=1, **kw)  # type: ignore[arg-type]


def count_requests(worker: WorkerTelemetry, n: int, conn_id: int, status: Callable[[int], int] = lambda i: 200,
                   read_bytes: int = 10, write_bytes: int = 5) -> None:
    """One web -> voting:8080 HTTP/1 connection carrying `n` requests (status(i) each), then closed."""
    meta = ConnectionMeta(conn_id, "outbound", (WEB, 40000 + conn_id), (VOTING, 8080), (VOTING, 8080), "http1",
                          started=time.monotonic())
    c = worker.connection_open(meta)
    for i in range(n):
        t0 = time.monotonic()
        r = worker.request_start(c, RequestHead("GET", "http", "voting:8080", f"/v/{i}", stream_id=i + 1, started=t0))
        worker.response_start(r, status(i), [], t0 + 0.001)
        worker.request_end(r, RequestEnd(response_bytes=3, ended=t0 + 0.002))
    worker.connection_close(c, ConnectionEnd(read_bytes=read_bytes, write_bytes=write_bytes, ended=time.monotonic()))

"""Real worker processes + workerlink + NodeTelemetry's admin over real HTTP (loopback, no root).

Two spawned workers count requests through WorkerTelemetry; the parent's /metrics shows their
merged totals. A SIGKILLed worker's counts stay (its open-connection gauge goes), a restarted
worker adds on top, and the totals never go backwards. Tap commands reach the workers and their
events come back: every request at low rate gives three events; above max_rps events are capped
while every request is still counted.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.process import BaseProcess

import pytest
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.observe import ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.agent.workerlink import ChannelEnd, make_channel
from nodemesh.api.gen import nodemesh_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

WEB, VOTING = "10.244.1.5", "10.244.2.7"
CTX = mp.get_context("spawn")  # the parent runs an event loop: never fork it


def worker_main(cfg: AgentConfig, end: ChannelEnd, index: int, n: int, wait_tap: bool, interval: float) -> None:
    """Count `n` requests (after a tap is open, if asked), keep one connection open, then idle."""

    async def main() -> None:
        tel = WorkerTelemetry(cfg, end, index)
        await tel.start()
        deadline = time.monotonic() + 10  # the parent sends the identity right after attach_worker
        while not tel.index.generation:
            assert time.monotonic() < deadline, "no identity from the parent"
            await asyncio.sleep(0.01)
        if wait_tap:
            while not tel.taps.taps:
                await asyncio.sleep(0.01)
        held = tel.connection_open(ConnectionMeta(1, "outbound", (WEB, 50000), (VOTING, 80), (VOTING, 80),
                                                  "http1", started=time.monotonic()))
        for i in range(n):
            t0 = time.monotonic()
            r = tel.request_start(held, RequestHead("GET", "http", "voting", f"/{i}", stream_id=i + 1, started=t0))
            tel.response_start(r, 200, [], t0 + 0.001)
            tel.request_end(r, RequestEnd(response_bytes=7, ended=t0 + 0.002))
            if interval:
                await asyncio.sleep(interval)
        tel.send_snapshot()
        await asyncio.sleep(3600)  # idle until killed: the connection stays open

    asyncio.run(main())


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot()
    for ip, name, node in ((WEB, "web", "node-1"), (VOTING, "voting", "node-2")):
        snap.pods.append(pb.Pod(ip=ip, namespace="emojivoto", name=f"{name}-abc", node=node, ready=True,
                                owner=pb.Resource(namespace="emojivoto", type="deployment", name=name)))
    return snap


class Harness:
    def __init__(self, node: NodeTelemetry) -> None:
        self.node = node
        self.procs: dict[int, BaseProcess] = {}

    def spawn(self, index: int, n: int, *, wait_tap: bool = False, interval: float = 0.0) -> BaseProcess:
        parent_end, child_end = make_channel()
        self.node.attach_worker(index, parent_end)
        p = CTX.Process(target=worker_main, args=(self.node.config, child_end, index, n, wait_tap, interval),
                        daemon=True)
        p.start()
        child_end.close()  # the child has its own copy now
        self.procs[index] = p
        return p

    def kill(self, index: int) -> None:
        p = self.procs.pop(index)
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)

    def kill_all(self) -> None:
        for index in list(self.procs):
            self.kill(index)


async def scrape(node: NodeTelemetry, **labels: str) -> dict[str, float]:
    """Sum of every sample by sample name, over the series whose labels include `labels`."""
    url = f"http://127.0.0.1:{node.admin.port}/metrics"
    text = await asyncio.get_running_loop().run_in_executor(
        None, lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def harness() -> Iterator[Callable[[Callable[[Harness], Awaitable[None]]], None]]:
    made: list[Harness] = []

    def run(body: Callable[[Harness], Awaitable[None]]) -> None:
        async def main() -> None:
            node = NodeTelemetry(AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0,
                                             report_interval_s=0.1, workers=2))
            h = Harness(node)
            made.append(h)
            await node.start()
            try:
                node.apply_identity(identity())
                await body(h)
            finally:
                h.kill_all()
                await node.stop()

        asyncio.run(asyncio.wait_for(main(), 90))

    try:
        yield run
    finally:
        for h in made:  # belt and braces if the loop died before its own finally
            h.kill_all()


def test_two_workers_merge_and_a_killed_worker_keeps_its_counts(harness) -> None:  # type: ignore[no-untyped-def]
    async def body(h: Harness) -> None:
        node = h.node
        h.spawn(0, 30)
        h.spawn(1, 50)
        seen: list[float] = []

        async def total_is(n: float) -> bool:
            m = await scrape(node)
            seen.append(m.get("request_total", 0.0))
            return m.get("request_total") == n

        await wait_for(lambda: total_is(80), what="80 requests merged from two workers")
        m = await scrape(node)
        # Identity reached the spawned workers: every request attributed web -> voting, outbound only.
        edge = await scrape(node, direction="outbound", src_kind="deployment", src_name="web",
                            dst_name="voting", dst_pod="voting-abc")
        assert edge["request_total"] == 80
        assert m["response_total"] == 80 and m["response_latency_ms_count"] == 80
        assert m["tcp_open_connections"] == 2 and m["tcp_open_total"] == 2

        h.kill(0)
        await wait_for(lambda: asyncio.sleep(0, result=0 not in node.workers), what="worker 0 link closed")
        m = await scrape(node)
        assert m["request_total"] == 80, "a killed worker's counts were lost"
        assert m["tcp_open_connections"] == 1  # its connection died with it

        h.spawn(0, 5)  # the restarted worker counts from zero; the node adds it on top
        await wait_for(lambda: total_is(85), what="85 after the restart")
        assert m["tcp_open_total"] == 2 and (await scrape(node))["tcp_open_total"] == 3
        assert seen == sorted(seen), f"totals went backwards: {seen}"

        # Ready / live / capture over real HTTP.
        loop = asyncio.get_running_loop()

        def status(path: str) -> int:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{node.admin.port}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await loop.run_in_executor(None, status, "/ready") == 503
        node.set_ready(True)
        assert await loop.run_in_executor(None, status, "/ready") == 200
        assert await loop.run_in_executor(None, status, "/live") == 200

    harness(body)


def test_tap_through_workers_low_rate_all_and_high_rate_capped(harness) -> None:  # type: ignore[no-untyped-def]
    async def body(h: Harness) -> None:
        node = h.node
        events: list[pb.TapEvent] = []
        node.add_tap_sink(events.append)
        # This node runs web: the tap shows web's own (outbound) calls to voting (agent/tap.py).
        target = pb.Resource(namespace="emojivoto", type="deployment", name="web")
        # Low rate: 20 requests at ~50/s under a 100/s cap -> every one gives its three events.
        node.open_tap("low", pb.TapFilter(target=target, max_rps=100))
        h.spawn(0, 20, wait_tap=True, interval=0.02)
        await wait_for(lambda: asyncio.sleep(0, result=len(events) >= 60), what="60 events")
        await asyncio.sleep(0.3)
        assert len(events) == 60
        ids = {e.request_id for e in events}
        assert len(ids) == 20
        for rid in ids:
            kinds = [e.WhichOneof("event") for e in events if e.request_id == rid]
            assert kinds == ["request_init", "response_init", "response_end"]
        node.close_tap("low")
        h.kill(0)

        # High rate: 3000 requests as fast as the worker goes, cap 20/s -> capped, all counted.
        events.clear()
        node.open_tap("high", pb.TapFilter(target=target, max_rps=20))
        h.spawn(1, 3000, wait_tap=True)

        async def all_counted() -> bool:
            return (await scrape(node)).get("request_total") == 3020

        await wait_for(all_counted, what="3000 more requests counted")
        await asyncio.sleep(0.3)
        admitted = len(events) // 3
        assert len(events) % 3 == 0
        # burst of 20 plus refill while the loop ran (well under a few seconds)
        assert 20 <= admitted <= 20 + 20 * 5, admitted
        assert {e.tap_id for e in events} == {"high"}
        assert all(e.request_id.startswith("1.1:") for e in events)  # worker 1's ids carry its index
        node.close_tap("high")

    harness(body)

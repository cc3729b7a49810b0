"""A failed upstream connect to an endpoint the agent chose is tried once more elsewhere (relay._dial,
endpoints.EndpointPicker.retry): loopback, no root. A *refused* endpoint is a port nobody listens
on; an endpoint that *times out* is a listener with a full accept queue (its SYNs are dropped, as
for an address nobody answers)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from loopback_relay import Recorder, echo_server, run, serve, wait_until
from nodemesh.agent.admission import Admission
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.relay import WorkerContext

Endpoint = tuple[str, int]


class _Recorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.endpoints: list[Endpoint] = []

    def connection_endpoint(self, conn: Any, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)


class _Service:
    """The agent's listener address stands for a Service whose endpoints are `endpoints`."""

    def __init__(self, address: Endpoint, endpoints: list[Endpoint]) -> None:
        self.address, self.endpoints = address, endpoints

    def service_endpoints(self, ip: str, port: int) -> list[Endpoint] | None:
        return list(self.endpoints) if (ip, port) == self.address else None


def _refused_endpoint() -> Endpoint:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = s.getsockname()
    s.close()  # bound once, never listening: connects are refused
    return address


def _silent_endpoint() -> tuple[Endpoint, list[socket.socket]]:
    """A listener whose accept queue is full and never drained: a connect to it hangs (SYN dropped)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(2):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lst.getsockname())
        fillers.append(c)
    return lst.getsockname(), [lst, *fillers]


async def _start(endpoints: list[Endpoint], **config: Any) -> tuple[asyncio.Server, int, WorkerContext, list[Any]]:
    server, port, ctx = await serve(_Recorder(), lambda listen: _Service(listen, endpoints), Admission(1000),
                                    **config)
    retries: list[Any] = []
    ctx.count_retry = lambda via, outcome: retries.append((via, outcome))
    return server, port, ctx, retries


async def _echo_once(port: int, i: int, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = b"hello %d\n" % i
        writer.write(line)
        return await asyncio.wait_for(reader.readexactly(len(line)), timeout)
    finally:
        writer.close()


def test_a_refused_endpoint_is_retried_on_another_and_then_avoided() -> None:
    async def scenario() -> None:
        up = await echo_server()
        live = up.sockets[0].getsockname()[:2]
        dead = _refused_endpoint()
        server, port, ctx, retries = await _start([dead, live])
        try:
            for i in range(30):
                assert await _echo_once(port, i) == b"hello %d\n" % i
            # The dead endpoint was picked at least once (two endpoints, 30 picks), retried on the
            # live one; then it is suspect and not picked again.
            assert retries and set(retries) == {("endpoint", "connected")}, retries
            assert dead in ctx.picker.suspect and len(retries) <= 2, retries
            assert await wait_until(lambda: not ctx.live and not ctx.picker.open)
        finally:
            server.close()
            up.close()

    run(scenario)


def test_a_silent_endpoint_is_retried_within_one_connect_timeout() -> None:
    """The first try gets half the connect timeout, the retry what is left: the worst case stays
    `connect_timeout_s`, it is not doubled."""
    async def scenario() -> None:
        up = await echo_server()
        live = up.sockets[0].getsockname()[:2]
        silent, keep = _silent_endpoint()
        server, port, ctx, retries = await _start([silent, live], connect_timeout_s=1.0)
        ctx.picker._rng.sample = lambda pop, k: [silent, live]  # type: ignore[method-assign]  # silent first
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await _echo_once(port, 1) == b"hello 1\n"
            took = loop.time() - started
            assert 0.4 <= took < 1.0, took          # waited half the budget, not the whole of it
            assert retries == [("endpoint", "connected")], retries
            assert ctx.observer.endpoints in ([], [live])  # the observer hears of it if it was open
            assert await wait_until(lambda: not ctx.live)
        finally:
            server.close()
            up.close()
            for s in keep:
                s.close()

    run(scenario)


def test_retry_picks_another_ready_endpoint_else_the_service_address() -> None:
    a, b = ("10.0.0.1", 80), ("10.0.0.2", 80)
    picker = EndpointPicker(_Service(("10.96.0.1", 80), [a, b]))
    assert picker.retry("10.96.0.1", 80, a) == b
    assert picker.retry("10.96.0.1", 80, b) == ("10.96.0.1", 80)   # both suspect now: kube-proxy decides
    assert all(picker.pick("10.96.0.1", 80) in (a, b) for _ in range(10))  # all suspect: still picks one
    picker.suspect.clear()
    picker.retry("10.96.0.1", 80, a)
    assert {picker.pick("10.96.0.1", 80) for _ in range(20)} == {b}    # a avoided while suspect

"""Admission on the relay (loopback, no root): what a shed client is told, slow heads, and that a
closed connection's memory is freed at once (no reference cycle left for the collector)."""

from __future__ import annotations

import asyncio
import gc
import struct
from collections.abc import Callable
from typing import Any

from loopback_relay import LoopIndex, Recorder, echo_server, run, serve, start, wait_until
from nodemesh.agent.admission import Admission
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.housekeeping import Housekeeping
from nodemesh.agent.observe import RequestHead
from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import listen_socket

GOAWAY, SETTINGS = 7, 4


async def sink_server() -> asyncio.Server:
    """Reads everything, answers nothing (a server still waiting for the request head)."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await r.read(65536):
            pass
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


def _full(admission: Admission, source: str = "127.0.0.1") -> Admission:
    """The worker is full: every new connection is shed for capacity."""
    for _ in range(admission.capacity):
        admission.admit(source)
    return admission


def test_shed_http1_gets_503_and_is_counted() -> None:
    async def scenario() -> None:
        up = await echo_server()
        server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], _full(Admission(16)))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = await read_all(reader)
            assert got.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), got
            writer.close()
            assert await wait_until(lambda: rec.closes == ["shed: capacity"]), rec.closes
            assert rec.protocols == ["http1"] and not ctx.live and not ctx.picker.open
            assert ctx.admission.open == 16
        finally:
            server.close()
            up.close()

    run(scenario)


def test_shed_http2_gets_settings_and_goaway_enhance_your_calm() -> None:
    async def scenario() -> None:
        up = await echo_server()
        server, port, _ctx, rec = await start(up.sockets[0].getsockname()[:2], _full(Admission(16)))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0")
            got = await read_all(reader)
            assert got[3] == SETTINGS and got[9 + 3] == GOAWAY, got
            last, code = struct.unpack(">LL", got[18:26])
            assert (last, code) == (0, 0xB), got
            writer.close()
            assert await wait_until(lambda: rec.closes == ["shed: capacity"])
        finally:
            server.close()
            up.close()

    run(scenario)


def test_shed_opaque_tcp_gets_a_reset() -> None:
    async def scenario() -> None:
        up = await echo_server()
        server, port, _ctx, rec = await start(up.sockets[0].getsockname()[:2], _full(Admission(16)))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00binary protocol")
            try:
                got = await read_all(reader)
                raise AssertionError(f"expected a reset, got {got!r}")
            except ConnectionResetError:
                pass
            writer.close()
            assert await wait_until(lambda: rec.closes == ["shed: capacity"])
        finally:
            server.close()
            up.close()

    run(scenario)


def test_slowloris_gets_408_at_the_header_timeout_not_an_opaque_relay() -> None:
    async def scenario() -> None:
        up = await sink_server()
        server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(1000),
                                             detect_timeout_s=0.2, header_timeout_s=0.6)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = asyncio.ensure_future(reader.read())
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":   # one byte every 0.1 s: never a whole head
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            got = await asyncio.wait_for(answer, 3)
            took = loop.time() - started
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert 0.6 <= took < 2.0, took   # detection at 0.2 s, then the 0.6 s header timeout
            writer.close()
            assert await wait_until(lambda: rec.closes != [])
            assert rec.protocols == ["http1"] and ctx.admission.slow == {}
        finally:
            server.close()
            up.close()

    run(scenario)


def test_a_source_past_its_slow_cap_gets_408_at_the_detection_timeout() -> None:
    async def scenario() -> None:
        up = await sink_server()
        server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(1000, max_slow=2),
                                             detect_timeout_s=0.2, header_timeout_s=30)
        try:
            conns = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GE")
                conns.append((reader, writer))
            got = await asyncio.gather(*(asyncio.wait_for(r.read(), 1.5) for r, _ in conns), return_exceptions=True)
            answered = [g for g in got if isinstance(g, bytes)]
            assert len(answered) == 1 and answered[0].startswith(b"HTTP/1.1 408 "), got
            assert ctx.admission.slow == {"127.0.0.1": 2}
            for _, w in conns:
                w.close()
            assert await wait_until(lambda: len(rec.closes) == 3)
            assert rec.closes.count("shed: slow") == 1, rec.closes
            assert await wait_until(lambda: ctx.admission.slow == {} and ctx.admission.open == 0)
        finally:
            server.close()
            up.close()

    run(scenario)


def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    async def scenario() -> None:
        up = await echo_server()
        server, port, ctx, _rec = await start(up.sockets[0].getsockname()[:2], Admission(1000))
        gc.disable()
        try:
            for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00opaque"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await wait_until(lambda: len(ctx.live) == 1)
                writer.write(payload)
                await asyncio.wait_for(reader.read(len(payload)), 3)
                writer.close()
                await wait_until(lambda: not ctx.live)
            await asyncio.sleep(0.05)
            # Connection has __slots__ and no weakref slot: look for survivors among tracked objects.
            assert [o for o in gc.get_objects() if isinstance(o, Connection) and o.ctx is ctx] == []
        finally:
            gc.enable()
            server.close()
            up.close()

    run(scenario)




async def http_server() -> asyncio.Server:
    """Answers every request head with a tiny 200 (keep-alive)."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Requests(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        self.requests.append(head.path)
        return head


def test_a_client_silent_past_the_detection_timeout_is_still_detected_when_it_speaks() -> None:
    """A connection opened ahead of its first request (a pool warming up, a client slowed by its
    node's load) is not settled as opaque TCP for its silence: its requests are still counted."""
    async def scenario() -> None:
        up = await http_server()
        rec = Requests()
        server, port, _ = await serve(rec, up.sockets[0].getsockname()[:2], Admission(1000), detect_timeout_s=0.2)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.6)  # three detection timeouts of silence
            for path in ("/a", "/b"):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                got = await asyncio.wait_for(reader.readexactly(len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")), 3)
                assert got.endswith(b"ok"), got
            assert rec.protocols == ["http1"] and rec.requests == ["/a", "/b"], (rec.protocols, rec.requests)
            writer.close()
            assert await wait_until(lambda: rec.closes != [])
        finally:
            server.close()
            up.close()

    run(scenario)


def test_a_late_slowloris_still_gets_its_408() -> None:
    async def scenario() -> None:
        up = await sink_server()
        server, port, _ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(1000),
                                              detect_timeout_s=0.2, header_timeout_s=0.6)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.5)  # its first byte comes after the detection timeout
            answer = asyncio.ensure_future(reader.read())
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            got = await asyncio.wait_for(answer, 3)
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert rec.protocols == ["http1"]
            writer.close()
        finally:
            server.close()
            up.close()

    run(scenario)


def test_a_server_that_speaks_first_is_relayed_as_tcp_at_once() -> None:
    async def scenario() -> None:
        async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"220 smtp.example ESMTP\r\n")
            while data := await r.read(65536):
                w.write(data)
            w.close()

        up = await asyncio.start_server(greet, "127.0.0.1", 0)
        server, port, _ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(1000),
                                              detect_timeout_s=5.0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)  # long before the 5 s timeout
            assert got == b"220 smtp.example ESMTP\r\n" and rec.protocols == ["tcp"], (got, rec.protocols)
            writer.write(b"EHLO me\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 2) == b"EHLO me\r\n"
            writer.close()
            assert await wait_until(lambda: rec.closes != [])
        finally:
            server.close()
            up.close()

    run(scenario)


def test_an_unexpected_error_in_the_upstream_connect_fails_the_connection_instead_of_leaking_it(
        monkeypatch: Any) -> None:
    """uvloop once refused a new socket's fd with RuntimeError ("File descriptor N is used by
    transport"): the connect task died, its connection stayed open and counted for good. Any error
    there now fails the connection like a refused connect: the client is reset, the end recorded."""
    async def broken_dial(self: Connection, peer: tuple[str, int], destination: tuple[str, int]) -> Any:
        raise RuntimeError("File descriptor 18 is used by transport <TCPTransport closed=False reading=True>")

    async def scenario() -> None:
        up = await echo_server()
        server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(16))
        monkeypatch.setattr(Connection, "_dial", broken_dial)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                got = await asyncio.wait_for(reader.read(), 5)  # reset, as a refused connect is: never left hanging
            except ConnectionResetError:
                got = b"reset"
            assert got == b"reset", got
            writer.close()
            assert await wait_until(lambda: rec.closes == ["connect: RuntimeError"]), rec.closes
            assert not ctx.live and ctx.admission.open == 0
        finally:
            server.close()
            up.close()

    run(scenario)


async def _relay_of(make: Callable[[WorkerContext], Connection]) -> tuple[asyncio.Server, asyncio.Server, int,
                                                                        WorkerContext, Recorder]:
    """An echo server behind a loopback relay whose connections `make` builds: (echo server, relay
    server, relay port, its context, its recorder)."""
    up = await echo_server()
    upstream = up.sockets[0].getsockname()[:2]
    server, _, ctx, rec = await start(upstream, Admission(64))
    server.close()
    listener = listen_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    ctx.picker = EndpointPicker(LoopIndex(("127.0.0.1", port), upstream))
    server = await asyncio.get_running_loop().create_server(lambda: make(ctx), sock=listener)
    return up, server, port, ctx, rec


def _leak_scenario(make: Callable[[WorkerContext], Connection], monkeypatch: Any = None,
                   dial: Any = None) -> None:
    """20 connections through `make`'s Connection; every one must end: closed once, nothing live,
    no admission slot held."""
    async def scenario() -> None:
        if dial is not None:
            monkeypatch.setattr(Connection, "_dial", dial)
        up, server, port, ctx, rec = await _relay_of(make)
        clients = []
        try:
            for _ in range(20):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"\x00opaque")
                clients.append(writer)
                if dial is not None:
                    await asyncio.sleep(0.02)
                    writer.transport.abort()  # gone while the agent connects upstream
            assert await wait_until(lambda: len(rec.closes) == 20 and not ctx.live, 5.0), (len(rec.closes), len(ctx.live))
            assert ctx.admission.open == 0
        finally:
            server.close()
            up.close()
            for w in clients:
                w.transport.abort()

    run(scenario)


def test_a_connect_cancelled_before_it_started_still_finishes_the_connection() -> None:
    """Closing both sides in the very callback that created the upstream connect task cancels the
    task before its first step, which then never runs its body (nor its handlers): the connection
    stayed `connecting` for good — never finished, counted open, its admission slot held."""
    class CloseAtOnce(Connection):
        __slots__ = ()

        def _accepted(self, peer: tuple[str, int], original: tuple[str, int], held_since: float) -> None:
            super()._accepted(peer, original, held_since)
            assert self.connect_task is not None  # created, not started
            self.close_both()

    _leak_scenario(lambda ctx: CloseAtOnce(ctx, "outbound"))


def test_a_connect_that_completes_as_the_client_leaves_still_finishes_the_connection(monkeypatch: Any) -> None:
    """Python 3.11's wait_for returns the result of a connect that completed together with the
    cancel, swallowing the cancel. Here the dial ignores the cancel outright: the connection must
    still end once its connect is done (the upstream it opens for a client already gone is closed,
    and that close finishes it)."""
    real_dial = Connection._dial

    async def dial_ignoring_cancel(self: Connection, peer: tuple[str, int],
                                   destination: tuple[str, int]) -> Any:
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            pass  # as wait_for does when the connect completed at the same moment
        return await real_dial(self, peer, destination)

    _leak_scenario(lambda ctx: Connection(ctx, "outbound"), monkeypatch, dial_ignoring_cancel)


def test_housekeeping_reaps_a_stuck_connection_and_leaves_live_ones_alone(monkeypatch: Any) -> None:
    """The safety net under the state machine: with the cancel-before-start fix taken out again (a
    stand-in for the next such bug), connections closed in the callback that created their connect
    task stay stuck; housekeeping's sweep finishes them (counted closed, admission slots back), and
    leaves a live relayed connection alone."""
    def cancel_only(self: Connection) -> None:  # the old behaviour: cancel, nothing else
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()

    monkeypatch.setattr(Connection, "_cancel_connect", cancel_only)

    class CloseAtOnce(Connection):
        __slots__ = ()

        def _accepted(self, peer: tuple[str, int], original: tuple[str, int], held_since: float) -> None:
            super()._accepted(peer, original, held_since)
            if self.meta is not None and self.meta.conn_id <= 10:  # the first ten: closed at once
                self.close_both()

    async def scenario() -> None:
        up, server, port, ctx, rec = await _relay_of(lambda ctx: CloseAtOnce(ctx, "outbound"))
        live, closed = [], 10
        try:
            for i in range(closed + 3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i < closed:
                    await wait_until(lambda n=i + 1: len(ctx.live) == n)
                    writer.transport.abort()
                else:
                    live.append((reader, writer))
            await asyncio.sleep(0.3)
            assert len(ctx.live) == closed + len(live), "the stand-in bug no longer leaks: the test proves nothing"
            hk = Housekeeping(ctx.admission, (ctx.live,))
            assert hk.sweep() == closed
            await asyncio.sleep(0.05)
            assert len(ctx.live) == len(live) and len(rec.closes) == closed
            assert hk.sweep() == 0
            for reader, writer in live:  # still relayed
                writer.write(b"\x00ping")
                assert await asyncio.wait_for(reader.readexactly(5), 3) == b"\x00ping"
        finally:
            server.close()
            up.close()
            for _, w in live:
                w.transport.abort()
            await wait_until(lambda: not ctx.live, 3.0)  # the echo server's handlers end before the loop does

    run(scenario)

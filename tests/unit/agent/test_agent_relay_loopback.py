"""The relay (relay.Connection and its modes) on loopback, no root: peers misbehaving at awkward
moments. The listener's own address is mapped by the endpoint picker to a real upstream server,
so the agent proxies without any capture rule; transparent mode is off."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
from typing import Any

from loopback_relay import run, serve, wait_until
from nodemesh.agent.observe import ALL_HEADERS, ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.relay import WorkerContext


class Recorder:
    """Observer that keeps what it was told, in order."""

    headers_gate = ALL_HEADERS

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connection_open(self, meta: ConnectionMeta) -> Any:
        self.events.append(("open", meta.protocol))
        return meta

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.events.append(("close", end.error))

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        self.events.append(("request", head.method, head.path))
        return head

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        self.events.append(("response", status))

    def request_end(self, req: Any, end: RequestEnd) -> None:
        self.events.append(("end", end.reset_error, end.request_bytes))

    def kinds(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


class Proxy:
    def __init__(self, server: asyncio.Server, port: int, ctx: WorkerContext, rec: Recorder) -> None:
        self.server, self.port, self.ctx, self.rec = server, port, ctx, rec


async def start_proxy(upstream: tuple[str, int], **config: Any) -> Proxy:
    rec = Recorder()
    server, port, ctx = await serve(rec, upstream, **config)
    return Proxy(server, port, ctx, rec)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_client_reset_before_accept_leaks_nothing() -> None:
    # A client that resets right after the handshake (port scanners, probes with SO_LINGER 0):
    # the accepted socket has no peer address any more. It must be closed, not left open.
    async def scenario() -> None:
        upstream = socket.create_server(("127.0.0.1", 0))
        proxy = await start_proxy(upstream.getsockname()[:2])
        try:
            await asyncio.sleep(0.05)
            before = _open_fds()
            for _ in range(5):
                for _ in range(10):
                    c = socket.create_connection(("127.0.0.1", proxy.port))
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()
                await asyncio.sleep(0.05)
            assert await wait_until(lambda: (gc.collect(), _open_fds())[1] <= before)
            assert not proxy.ctx.live and not proxy.ctx.picker.open
        finally:
            proxy.server.close()
            upstream.close()

    run(scenario)


def test_upstream_refused_resets_client_quickly() -> None:
    async def scenario() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))   # bound, not listening: connects are refused
        proxy = await start_proxy(closed.getsockname()[:2])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            try:
                data = await asyncio.wait_for(reader.read(100), 2)
                assert data == b""
            except ConnectionResetError:
                pass
            writer.close()
            assert await wait_until(lambda: not proxy.ctx.live)
            assert proxy.rec.kinds("close") == [("close", "connect: ECONNREFUSED")]
        finally:
            proxy.server.close()
            closed.close()

    run(scenario)


def test_client_gone_while_upstream_connect_pending() -> None:
    async def scenario() -> None:
        # A listener with a full backlog (0: one queued connection) drops further SYNs: the
        # agent's connects stay pending.
        full = socket.create_server(("127.0.0.1", 0), backlog=0)
        fillers = [socket.create_connection(full.getsockname()[:2], timeout=2)]
        proxy = await start_proxy(full.getsockname()[:2], connect_timeout_s=30.0)
        try:
            for _ in range(5):
                _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                await asyncio.sleep(0.05)
                # The client gives up: a reset (a FIN is a half-close: the agent keeps waiting).
                sock = writer.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            # Seen at once, not when the 30 s connect timeout ends.
            assert await wait_until(lambda: not proxy.ctx.live)
            assert len(proxy.rec.kinds("close")) == 5 and not proxy.ctx.picker.open
        finally:
            proxy.server.close()
            for s in fillers:
                s.close()
            full.close()

    run(scenario)


def test_h2_server_settings_then_close_before_client_preface() -> None:
    # An HTTP/2 server's SETTINGS is held until the client's preface decides the protocol; if the
    # server closes meanwhile, the held bytes must still reach the client before its EOF.
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(settings)
        writer.write_eof()
        await reader.read()
        writer.close()

    async def scenario() -> None:
        upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy = await start_proxy(upstream.sockets[0].getsockname()[:2])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            await asyncio.sleep(0.2)
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
            got = await asyncio.wait_for(reader.read(), 3)
            assert got == settings
            writer.close()
            assert await wait_until(lambda: not proxy.ctx.live)
        finally:
            proxy.server.close()
            upstream.close()

    run(scenario)


def test_agent_answer_after_server_half_closed() -> None:
    # The server shut its sending side (write_eof went to the client); a request head that never
    # ends then gets no 408 (writing after write_eof raises inside the callback) but the connection
    # still ends. (A bad request is no longer the agent's to answer: it goes to the server.)
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write_eof()
        await reader.read()
        writer.close()

    async def scenario() -> None:
        upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy = await start_proxy(upstream.sockets[0].getsockname()[:2], header_timeout_s=0.3)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nX-Never: ")
            assert await wait_until(lambda: not proxy.ctx.live, timeout=5)
            writer.close()
        finally:
            proxy.server.close()
            upstream.close()

    run(scenario)

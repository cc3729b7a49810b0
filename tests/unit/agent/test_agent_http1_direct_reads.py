"""HTTP/1 reads straight into the mode (seam.DirectReads, docs/bench.md "Hot path steps", step 8):
once the protocol is decided and both sides are connected, the transports' protocols are the
mode's readers, and everything the connection did per read still happens — bytes counted, the
source's fairness work counted, requests observed, EOF and close reaching the connection — on
loopback, a real keep-alive server, no root."""

from __future__ import annotations

import asyncio
from typing import Any

from loopback_relay import Recorder, run, serve, wait_until
from nodemesh.agent.http1_relay import _ClientReads, _UpstreamReads
from nodemesh.agent.observe import ConnectionEnd
from nodemesh.agent.relay import Connection

REQ = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def keepalive_server() -> asyncio.Server:
    """Answers every request head (and its Content-Length body) with RESP, on one connection."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await r.readexactly(int(line.split(b":")[1]))
                w.write(RESP)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Ends(Recorder):
    """Records request ends too (the loopback Recorder keeps opens and closes)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []
        self.statuses: list[int] = []
        self.ended = 0
        self.ends: list[tuple[str | None, int, int]] = []
        self.reset_errors: list[str | None] = []

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.ends.append((end.error, end.read_bytes, end.write_bytes))

    def request_start(self, conn: Any, head: Any) -> Any:
        self.requests.append((head.method, head.path))
        return object()

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        self.statuses.append(status)

    def request_end(self, req: Any, end: Any) -> None:
        self.ended += 1
        self.reset_errors.append(end.reset_error)


def test_keepalive_reads_go_to_the_mode_and_everything_is_still_counted() -> None:
    async def scenario() -> None:
        upstream = await keepalive_server()
        rec = Ends()
        server, port, ctx = await serve(rec, upstream.sockets[0].getsockname()[:2])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQ)
            assert await asyncio.wait_for(reader.readexactly(len(RESP)), 3) == RESP
            conn: Connection = next(iter(ctx.live))
            assert conn.client is not None and conn.up is not None
            assert isinstance(conn.client.get_protocol(), _ClientReads)
            assert isinstance(conn.up.get_protocol(), _UpstreamReads)
            work = conn.load.work
            # Keep-alive and a pipelined pair with a body, all through the mode's readers.
            writer.write(REQ)
            assert await asyncio.wait_for(reader.readexactly(len(RESP)), 3) == RESP
            writer.write(POST + REQ)
            assert await asyncio.wait_for(reader.readexactly(2 * len(RESP)), 3) == 2 * RESP
            assert conn.load.work >= work + 4   # each read, both directions: fairness still counts
            assert conn.read_bytes == 2 * len(REQ) + len(POST) + len(REQ)
            assert conn.write_bytes == 4 * len(RESP)
            # The client's EOF still reaches the connection: half-close, then the end.
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert await wait_until(lambda: not ctx.live)
            writer.close()
            assert rec.requests == [("GET", "/a"), ("GET", "/a"), ("POST", "/b"), ("GET", "/a")]
            assert rec.statuses == [200] * 4 and rec.ended == 4
            assert rec.ends == [(None, 2 * len(REQ) + len(POST) + len(REQ), 4 * len(RESP))]
        finally:
            server.close()
            upstream.close()

    run(scenario)


def test_the_server_closing_mid_exchange_reaches_the_connection_through_the_readers() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(RESP)
        await w.drain()
        await r.readuntil(b"\r\n\r\n")
        w.close()   # the second request: the server goes away without answering

    async def scenario() -> None:
        upstream = await asyncio.start_server(handle, "127.0.0.1", 0)
        rec = Ends()
        server, port, ctx = await serve(rec, upstream.sockets[0].getsockname()[:2])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQ)
            assert await asyncio.wait_for(reader.readexactly(len(RESP)), 3) == RESP
            conn: Connection = next(iter(ctx.live))
            assert isinstance(conn.up.get_protocol(), _UpstreamReads)  # type: ignore[union-attr]
            writer.write(REQ)
            # The server's EOF went to the connection (upstream_eof): the client is half-closed.
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert conn.up_eof
            writer.close()
            assert await wait_until(lambda: not ctx.live)
            assert rec.requests == [("GET", "/a"), ("GET", "/a")]
            assert rec.reset_errors == [None, "connection closed"]   # the unanswered one, not clean
            assert rec.ends == [(None, 2 * len(REQ), len(RESP))]
        finally:
            server.close()
            upstream.close()

    run(scenario)

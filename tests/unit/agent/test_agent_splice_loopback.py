"""Opaque TCP through the real relay with splice(2) (agent/splice.py), loopback, no root.

Each test runs with the splice on and off (the copying path), so both give the same answers:
bytes identical both ways (hashes), half-close in each direction, resets, a slow reader that
must not make the agent hold more than its pipes, and the counters equal to the bytes sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from typing import Any

import pytest
from loopback_relay import run, serve, wait_until
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.splice import Splice

MB = 1 << 20
SPLICE = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


class Ends:
    """An observer keeping each closed connection's end (bytes, error)."""

    def __init__(self) -> None:
        self.ends: list[ConnectionEnd] = []
        self.protocols: list[str] = []

    def connection_open(self, meta: ConnectionMeta) -> Any:
        self.protocols.append(meta.protocol)
        return meta

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.ends.append(end)

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        return head

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        pass

    def request_end(self, req: Any, end: RequestEnd) -> None:
        pass


def pattern(seed: int, n: int) -> bytes:
    """n bytes, opaque from the first (0x00 is no protocol's first byte), different per seed."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048   # 64 KiB
    data = (block * (n // len(block) + 1))[:n]
    return b"\x00" + data[1:]


def spliced(ctx: WorkerContext) -> list[Connection]:
    return [c for c in ctx.live if c.splice is not None]


async def _read_all(r: asyncio.StreamReader) -> bytes:
    parts = []
    while chunk := await r.read(MB):
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("use_splice", SPLICE)
def test_large_transfer_both_ways_identical_and_counted(use_splice: bool) -> None:
    """24 MiB each way at once; the client half-closes first, the server answers its hash after
    it has read everything and then closes: both halves of the close travel in order."""
    up_bytes = pattern(1, 24 * MB)
    down_bytes = pattern(2, 24 * MB)
    got_up: list[bytes] = []

    async def scenario() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(down_bytes)          # the server talks while the client does
            data = await _read_all(r)    # until the client's FIN
            got_up.append(data)
            w.write(hashlib.sha256(data).digest())
            await w.drain()
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        # The default threshold (splice_after_bytes, 1 MiB): bulk is spliced once past it.
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=use_splice)
        decisions: list[str] = []
        ctx.count_splice = decisions.append   # the worker's telemetry: nodemesh_splice_decisions_total
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(up_bytes)
        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(len(spliced(ctx)))
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        await w.drain()
        w.write_eof()
        answer = await asyncio.wait_for(_read_all(r), 30)
        watcher.cancel()
        w.close()
        assert await wait_until(lambda: len(obs.ends) == 1)
        assert answer[:-32] == down_bytes
        assert answer[-32:] == hashlib.sha256(up_bytes).digest()
        assert got_up == [up_bytes]
        end = obs.ends[0]
        assert (end.read_bytes, end.write_bytes, end.error) == (len(up_bytes), len(down_bytes) + 32, None)
        assert obs.protocols == ["tcp"]
        assert (max(seen) == 1) is use_splice   # it really was spliced (or really not)
        assert decisions == (["spliced"] if use_splice else [])
        assert not ctx.live
        server.close()
        up.close()

    run(scenario)


@pytest.mark.parametrize("use_splice", SPLICE)
def test_server_half_closes_first_client_keeps_sending(use_splice: bool) -> None:
    """The upstream says its piece and shuts its write side; the client still sends 8 MiB after
    reading the server's EOF, then half-closes; the server counts it and answers nothing more."""
    hello = pattern(3, 3 * MB)
    body = pattern(4, 8 * MB)
    server_got: list[int] = []

    async def scenario() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(hello)
            await w.drain()
            w.write_eof()
            server_got.append(len(await _read_all(r)))
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, _ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=use_splice, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x00")
        got = await asyncio.wait_for(_read_all(r), 30)   # until the server's FIN reaches us
        assert got == hello
        w.write(body)
        await w.drain()
        w.write_eof()
        assert await wait_until(lambda: len(obs.ends) == 1 and len(server_got) == 1, 10)
        assert server_got == [1 + len(body)]
        assert (obs.ends[0].read_bytes, obs.ends[0].write_bytes, obs.ends[0].error) == (1 + len(body), len(hello),
                                                                                      None)
        w.close()
        server.close()
        up.close()

    run(scenario)


@pytest.mark.parametrize("use_splice", SPLICE)
def test_upstream_reset_reaches_client_as_reset(use_splice: bool) -> None:
    async def scenario() -> None:
        resets: list[bool] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(2 * MB)   # mid-stream, spliced by now
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            resets.append(True)

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, _ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=use_splice, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(pattern(5, 2 * MB))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(_read_all(r), 10)
        assert await wait_until(lambda: len(obs.ends) == 1)
        assert obs.ends[0].error is not None and obs.ends[0].error.startswith("upstream: ")
        assert resets == [True]
        w.close()
        server.close()
        up.close()

    run(scenario)


@pytest.mark.parametrize("use_splice", SPLICE)
def test_client_reset_closes_upstream(use_splice: bool) -> None:
    async def scenario() -> None:
        upstream_saw: list[bytes] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(pattern(6, MB))
            try:
                upstream_saw.append(await _read_all(r))
            except ConnectionResetError:
                upstream_saw.append(b"reset")
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=use_splice, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x00" * 1000)
        await r.readexactly(MB)
        assert await wait_until(lambda: len(spliced(ctx)) == int(use_splice))
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
        assert await wait_until(lambda: len(obs.ends) == 1 and len(upstream_saw) == 1)
        assert obs.ends[0].error == "ConnectionResetError"
        assert upstream_saw[0] in (b"\x00" * 1000, b"reset")   # the upstream's side ended too
        assert not ctx.live
        server.close()
        up.close()

    run(scenario)


@pytest.mark.parametrize("use_splice", SPLICE)
def test_slow_reader_bounds_what_the_agent_holds(use_splice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server writes 64 MiB as fast as it can, the client reads nothing for a while: the
    server must block (the agent passes the backpressure on); with splice, the agent holds at
    most its pipes. Then everything arrives intact."""
    data = pattern(7, 64 * MB)

    async def scenario() -> None:
        sent = [0]

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            view = memoryview(data)
            for i in range(0, len(data), MB):
                w.write(view[i:i + MB])
                await w.drain()
                sent[0] = i + MB
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=use_splice, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=MB)
        w.transport.set_write_buffer_limits(0)
        w.write(b"\x00")
        await asyncio.sleep(0.5)          # not reading: the pipe and the socket buffers fill
        reads = [0]
        real_read = Splice._read

        def counted(self: Splice, d: Any, from_up: bool) -> None:
            reads[0] += 1
            real_read(self, d, from_up)

        monkeypatch.setattr(Splice, "_read", counted)
        await asyncio.sleep(0.5)
        stalled = sent[0]
        # Stalled, the agent must not spin on a readable source whose pipe is full (a level-
        # triggered poll would call it thousands of times a second).
        assert reads[0] < 50, reads
        held = [c.splice.buffered() for c in spliced(ctx)]
        print(f"slow reader: server wrote {stalled / MB:.0f} MiB before blocking, agent pipes hold {held}")
        assert stalled < 32 * MB          # socket buffers + the agent's bound, far from all 64 MiB
        if use_splice:
            assert held and held[0] <= 2 * 1024 * 1024
        got = await asyncio.wait_for(_read_all(r), 30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        w.write_eof()   # the server closed after its last byte: the client's FIN ends it
        assert await wait_until(lambda: len(obs.ends) == 1)
        assert obs.ends[0].write_bytes == len(data)
        w.close()
        server.close()
        up.close()

    run(scenario)


def test_throttle_pauses_a_spliced_connection_and_resumes_it() -> None:
    """fairness.py's throttle (a source over its budget) pauses both directions of a spliced
    connection; unthrottle resumes it; the bytes still all arrive."""
    data = pattern(8, 16 * MB)

    async def scenario() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(hashlib.sha256(await _read_all(r)).digest())
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=True, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x00")
        assert await wait_until(lambda: len(spliced(ctx)) == 1)
        conn = spliced(ctx)[0]
        conn.throttle()
        assert conn.splice is not None and conn.splice.paused
        before = conn.read_bytes
        w.write(data[1:])
        await asyncio.sleep(0.3)
        assert conn.read_bytes == before      # nothing read while throttled
        conn.unthrottle()
        await w.drain()
        w.write_eof()
        answer = await asyncio.wait_for(_read_all(r), 30)
        assert answer == hashlib.sha256(data).digest()
        assert await wait_until(lambda: len(obs.ends) == 1)
        assert obs.ends[0].read_bytes == len(data)
        w.close()
        server.close()
        up.close()

    run(scenario)


def test_abort_both_ends_a_spliced_connection() -> None:
    """drain.py's end of the grace (abort_both) and housekeeping see a spliced connection end
    and be counted closed, its fds gone."""
    async def scenario() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _read_all(r)
            w.close()

        up = await asyncio.start_server(handle, "127.0.0.1", 0)
        obs = Ends()
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice=True, splice_after_bytes=0)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x00abc")
        assert await wait_until(lambda: len(spliced(ctx)) == 1)
        conn = spliced(ctx)[0]
        assert not conn.reap_if_stuck()
        conn.abort_both()
        assert conn.finished and not ctx.live
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert len(obs.ends) == 1 and obs.ends[0].read_bytes == 4
        w.close()
        server.close()
        up.close()

    run(scenario)


def test_small_connections_are_not_spliced_and_the_count_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below splice_after_bytes a connection stays on the copying path (a pipe pair costs pages
    of the user's pipe budget); above it, at most MAX_SPLICED at once per process."""
    from nodemesh.agent import relay

    monkeypatch.setattr(relay, "MAX_SPLICED", 2)

    async def scenario() -> None:
        up = await asyncio.start_server(_echo, "127.0.0.1", 0)
        obs = Ends()
        server, port, ctx = await serve(obs, up.sockets[0].getsockname()[:2], splice_after_bytes=256 * 1024)
        small = await asyncio.open_connection("127.0.0.1", port)
        small[1].write(b"\x00" * 1000)
        assert await small[0].readexactly(1000) == b"\x00" * 1000
        await asyncio.sleep(0.1)
        assert not spliced(ctx)
        bulk = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for r, w in bulk:
            w.write(pattern(9, MB))
            assert await asyncio.wait_for(r.readexactly(MB), 10) == pattern(9, MB)
        assert len(spliced(ctx)) == 2 and Splice.live == 2
        for r, w in [small, *bulk]:
            w.write_eof()
            await asyncio.wait_for(r.read(), 5)
            w.close()
        assert await wait_until(lambda: len(obs.ends) == 4)
        assert Splice.live == 0 and all(e.error is None for e in obs.ends)
        server.close()
        up.close()

    run(scenario)


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()

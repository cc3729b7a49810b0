"""The admin server (:4191, hand-written on httptools) against clients that misbehave: it runs in
the agent's parent, so no client may make it hold memory or connections without bound."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import uvloop
from nodemesh.agent import admin
from nodemesh.agent.admin import AdminServer
from nodemesh.agent.metrics import merge


def run(scenario: Callable[[AdminServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = AdminServer("127.0.0.1", 0, snapshot=lambda: merge([]), ready=lambda: True,
                             excluded_ips=list)
        await server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    uvloop.run(main())


def test_admin_answers_and_keeps_alive() -> None:
    async def scenario(server: AdminServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(2):
            writer.write(b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await reader.readuntil(b"ready\n")).startswith(b"HTTP/1.1 200 OK")
        writer.close()

    run(scenario)


def test_admin_pipelining_client_that_never_reads_is_cut_off() -> None:
    # Thousands of pipelined /metrics requests from a client that reads nothing: the answers must
    # not pile up in the parent's memory.
    async def scenario(server: AdminServer) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        burst = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n" * 1000
        peak = 0
        try:
            for _ in range(40):
                try:
                    await asyncio.wait_for(loop.sock_sendall(sock, burst), 0.5)
                except (TimeoutError, OSError):
                    break
                await asyncio.sleep(0.01)
                for conn in server.connections:
                    if conn.transport is not None:
                        peak = max(peak, conn.transport.get_write_buffer_size())
            assert peak <= 2 * admin.MAX_WRITE_BUFFER
            await asyncio.sleep(0.05)
            assert not server.connections
        finally:
            sock.close()

    run(scenario)


def test_admin_idle_connections_are_closed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT_S", 0.3)

    async def scenario(server: AdminServer) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", server.port)
        slow.write(b"GET /ready HTTP/1.1\r\n")  # a head that never ends
        await asyncio.sleep(0.05)
        assert len(server.connections) == 4
        for reader, _ in [*idle, (slow_reader, slow)]:
            assert await asyncio.wait_for(reader.read(), 2) == b""
        assert not server.connections
        for _, writer in idle:
            writer.close()
        slow.close()

    run(scenario)

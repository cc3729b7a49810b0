"""Test peers run inside the server namespace: `python servers_agent_traffic.py KIND HOST PORT`."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from concurrent import futures


def grpc_server(host: str, port: int) -> None:
    import grpc

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b"echo:" + request

    def stream(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        n = int(request)
        for i in range(n):
            time.sleep(0.02)
            yield b"msg-%d" % i

    def collect(requests, context: grpc.ServicerContext) -> bytes:  # type: ignore[no-untyped-def]
        return hashlib.sha256(b"".join(requests)).hexdigest().encode()

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.wait_for_termination()


async def websocket_server(host: str, port: int) -> None:
    import websockets

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, host, port, max_size=None):
        await asyncio.Future()


async def bulk_server(host: str, port: int) -> None:
    """Reads until EOF, answers sha256 of what it got, then N bytes of a known pattern."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while chunk := await reader.read(1 << 16):
            h.update(chunk)
        writer.write(h.hexdigest().encode() + b"\n")
        block = bytes(range(256)) * 4096
        for _ in range(5):
            writer.write(block)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    await server.serve_forever()


async def banner_server(host: str, port: int) -> None:
    """Server speaks first (like SMTP/MySQL)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner ready\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.write(b"221 bye " + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    await server.serve_forever()


if __name__ == "__main__":
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "grpc":
        grpc_server(host, port)
    else:
        asyncio.run({"websocket": websocket_server, "bulk": bulk_server, "banner": banner_server}[kind](host, port))

"""gRPC unary server and load client for the bench (grpcio, asyncio API), run inside sandbox pods.

    python3 grpcpeer.py serve --port 9090
    python3 grpcpeer.py load --target 10.244.2.7:9090 --rate 0 --duration 10 --concurrency 32   # saturation
    python3 grpcpeer.py load --target 10.244.2.7:9090 --rate 300 --duration 10                 # fixed rate

The service is `/bench.Echo/Unary` with raw-bytes messages (generic handlers, no generated code):
the server answers every request with a fixed 64-byte payload. The client uses one channel (one
HTTP/2 connection, as a real grpcio client would) and prints one JSON summary like httpload.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
import openloop

METHOD = "/bench.Echo/Unary"
REPLY = b"r" * 64


async def serve(port: int) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return REPLY

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    await server.wait_for_termination()


async def load(args: argparse.Namespace) -> dict[str, float | int]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = channel.unary_unary(METHOD)
        payload = b"q" * 64

        async def one() -> bool:
            try:
                return await call(payload, timeout=10) == REPLY
            except grpc.aio.AioRpcError:
                return False

        workers = [one] * args.concurrency
        if args.rate > 0:
            return await openloop.fixed_rate(workers, args.rate, args.duration, args.warmup)
        return await openloop.saturate(workers, args.duration, args.warmup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9090)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True)
    ld.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = closed loop (saturation)")
    ld.add_argument("--duration", type=float, default=10.0)
    ld.add_argument("--warmup", type=float, default=1.0)
    ld.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    if args.cmd == "serve":
        asyncio.run(serve(args.port))
        return 0
    json.dump(asyncio.run(load(args)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

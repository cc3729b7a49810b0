"""Fixed-rate HTTP/1.1 keep-alive load generator (Debian has no wrk2): runs inside a client pod.

    python3 httpload.py --url http://10.244.1.5:8080/ --rate 1000 --duration 10 --connections 8

Open loop (see openloop.py): requests are due at a fixed rate over several keep-alive connections,
one request in flight per connection, latency measured from the due time when the request had to
wait for a busy connection. The request bytes are built once; responses are parsed with httptools
on an asyncio Protocol under uvloop, so the generator itself costs ~20 us per request.
Prints one JSON object: requests, errors, late, rps, p50_ms, p90_ms, p99_ms, p999_ms, max_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import urlsplit

import httptools
import openloop
import uvloop


class Connection(asyncio.Protocol):
    """One keep-alive connection; `request()` sends the pre-built request and waits for the end
    of its response."""

    def __init__(self, request: bytes) -> None:
        self.raw = request
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[bool] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(False)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(False)

    # httptools callback
    def on_message_complete(self) -> None:
        self._finish(self.parser.get_status_code() < 400)

    def _finish(self, ok: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(ok)

    async def request(self) -> bool:
        if self.closed or self.transport is None:
            return False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(self.raw)
        return await self.waiter


async def main_async(args: argparse.Namespace) -> dict[str, float | int]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    raw = (f"GET {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\nUser-Agent: nodemesh-bench\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    conns: list[Connection] = []
    for _ in range(args.connections):
        _, proto = await loop.create_connection(lambda: Connection(raw), host, port)
        conns.append(proto)
    try:
        if args.rate > 0:
            return await openloop.fixed_rate([c.request for c in conns], args.rate, args.duration, args.warmup)
        return await openloop.saturate([c.request for c in conns], args.duration, args.warmup)
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s; 0 = closed loop (saturation)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    result = uvloop.run(main_async(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

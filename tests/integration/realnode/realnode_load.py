"""A pod program for the realnode tests: steady, open-loop HTTP load that records every outcome.

    realnode_load.py --url http://server.rn/ --rate 100 --duration 60 --out FILE [--timeout 2]

Request i starts at start + i/rate whatever happened to earlier ones, each on a new connection
(HTTP/1.0, so a ClusterIP spreads them and every request is a new capture decision). One JSON line
per request is appended to FILE as soon as it ends: {"t": start (epoch s), "dt": seconds, "tc": seconds
to connected (when it connected), "ok": bool,
"status": int, "error": "refused" | "reset" | "timeout" | ..., "body": first 64 bytes}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from urllib.parse import urlsplit


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"errno{exc.errno}"
    return type(exc).__name__


async def one(host: str, port: int, path: str, vhost: str, timeout: float) -> dict[str, object]:
    t0 = time.time()
    record: dict[str, object] = {"t": t0}
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            record["tc"] = round(time.time() - t0, 4)   # connected (handshake done)
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {vhost}\r\nUser-Agent: realnode-load\r\n\r\n".encode())
            data = await reader.read()
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        record.update(ok=200 <= status < 400, status=status, body=body[:64].decode(errors="replace"))
        if not status:
            record["error"] = "empty" if not data else "garbled"
    except (OSError, TimeoutError) as exc:
        record.update(ok=False, status=0, error=_error_name(exc))
    finally:
        if writer is not None:
            writer.close()
    record["dt"] = round(time.time() - t0, 4)
    return record


async def run(url: str, rate: float, duration: float, out: str, timeout: float) -> None:
    parts = urlsplit(url)
    host = socket.gethostbyname(parts.hostname or "")
    port = parts.port or 80
    path = parts.path or "/"
    with open(out, "a", buffering=1) as f:  # noqa: ASYNC230 - one line per request, line-buffered
        def done(task: asyncio.Task[dict[str, object]]) -> None:
            f.write(json.dumps(task.result()) + "\n")

        start = time.monotonic()
        tasks: set[asyncio.Task[dict[str, object]]] = set()
        i = 0
        while (now := time.monotonic()) - start < duration:
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one(host, port, path, parts.netloc, timeout))
            task.add_done_callback(done)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    asyncio.run(run(a.url, a.rate, a.duration, a.out, a.timeout))


if __name__ == "__main__":
    main()

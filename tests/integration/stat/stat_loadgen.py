"""A pod program for the stat tests: an open-loop client that records what it sent and saw.

    stat_loadgen.py http --target IP:PORT --rate R --duration S --out FILE
                         [--host H] [--method M] [--path '/load/{i}'] [--plan PLAN.json]
    stat_loadgen.py grpc --target IP:PORT --rate R --calls N --out FILE [--method /stat.Echo/Get]

HTTP: request i is sent at start + i/rate whatever happened to earlier ones (open loop, so a slow
answer never lowers the offered rate), each on its own connection (`Connection: close`), so a
ClusterIP spreads them over the replicas. `--plan` gives an explicit list of {method, path, host}.
gRPC: sequential unary calls on one channel at `rate`. The out file is a JSON list with one record
per request: times (epoch seconds), status, the replica (`x-pod`), whether a 5xx was the server's
designed failure, and any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

# Linux (asm-generic, x86_64, arm64): receive timestamps as struct timespec, taken by the kernel
# when the packet arrived. Python's socket module does not export these names.
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TIMESPEC = struct.Struct("@ll")


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)


async def read_to_eof(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """The whole response, and the kernel's arrival time of its first byte (epoch seconds)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    first: float | None = None
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
        except BlockingIOError:
            await _readable(loop, sock.fileno(), max(0.01, deadline - time.monotonic()))
            continue
        if not data:
            return b"".join(chunks), first
        if first is None:
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack(payload[:TIMESPEC.size])
                    first = sec + nsec / 1e9
        chunks.append(data)


async def http_one(i: int, ip: str, port: int, method: str, path: str, host: str) -> dict[str, Any]:
    """One request on its own connection. `latency_ms` runs from just before the request is
    written to the kernel's arrival stamp of the response's first byte: time to response headers,
    as the agent measures it, plus the proxy hops, but without this process's own scheduling
    delays on a busy machine (`total_ms`, to the last byte read in user space, keeps those)."""
    loop = asyncio.get_running_loop()
    rec: dict[str, Any] = {"i": i, "method": method, "path": path, "host": host, "start": time.time()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), 5)
        request = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                   f"Content-Length: 0\r\n\r\n").encode()
        rec["send"] = time.time()
        await loop.sock_sendall(sock, request)
        raw, first_byte = await read_to_eof(sock, 10)
        rec["end"] = time.time()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        rec["status"] = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        rec["pod"] = headers.get("x-pod", "")
        rec["designed"] = body.startswith(b"designed failure")
        rec["latency_ms"] = ((first_byte or rec["end"]) - rec["send"]) * 1000.0
        rec["total_ms"] = (rec["end"] - rec["send"]) * 1000.0
    except Exception as exc:  # noqa: BLE001 - every failure is data for the test
        rec["end"] = time.time()
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return rec


async def run_http(args: argparse.Namespace) -> list[dict[str, Any]]:
    ip, _, port = args.target.rpartition(":")
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
    else:
        n = round(args.rate * args.duration)
        plan = [{"method": args.method, "path": args.path.replace("{i}", str(i)), "host": args.host}
                for i in range(n)]
    start = time.time() + 0.05
    tasks = []
    loop = asyncio.get_running_loop()
    for i, req in enumerate(plan):
        delay = start + i / args.rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(http_one(i, ip, int(port), req["method"], req["path"],
                                               req.get("host") or args.host)))
    return list(await asyncio.gather(*tasks))


def run_grpc(args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    records = []
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(args.method)
        start = time.time()
        for i in range(args.calls):
            delay = start + i / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            rec: dict[str, Any] = {"i": i, "method": args.method, "start": time.time()}
            try:
                call(f"call {i}".encode(), timeout=10)
                rec["code"] = 0
            except grpc.RpcError as err:
                rec["code"] = err.code().value[0]
                rec["details"] = err.details()
            rec["end"] = time.time()
            records.append(rec)
    return records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "grpc"])
    p.add_argument("--target", required=True)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--host", default="server")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/load/{i}")
    p.add_argument("--plan", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.mode == "grpc":
        if args.method == "GET":
            args.method = "/stat.Echo/Get"
        records = run_grpc(args)
    else:
        records = asyncio.run(run_http(args))
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(records))
    tmp.rename(args.out)  # the test polls for the file: it appears complete or not at all


if __name__ == "__main__":
    main()

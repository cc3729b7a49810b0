"""Real peers for the sandbox-wide mesh tests, run as sandbox pod processes or via `sandbox.exec`.

    python3 mesh_peers.py SERVER-KIND PORT            # grpc-server, bulk-server, ws-server, banner-server
    python3 mesh_peers.py CLIENT-KIND ARGS...         # prints one JSON object: what the client sent and saw

Every client verifies what it received (sha256 against what it computed locally) and reports the
counts the agents must reproduce; the test compares the agents' /metrics with that report. This
file imports only the stdlib at module level, so a client that needs neither grpc nor websockets
starts fast in a pod.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent import futures
from typing import Any

GRPC_SERVICE = "mesh.Echo"
BANNER = b"220 mesh-banner ESMTP ready\r\n"


def pattern(seed: int, n: int) -> bytes:
    """Deterministic bytes both peers can produce: what was received is compared with this."""
    return random.Random(seed).randbytes(n)


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- servers
def grpc_server(port: int) -> None:
    """grpcio with generic handlers (raw bytes, no generated code): unary, server streaming, bidi."""
    import grpc

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request.startswith(b"fail"):
            context.abort(grpc.StatusCode.NOT_FOUND, "asked to fail")
        return b"echo:" + request

    def server_stream(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        n, size, *delay_ms = (int(x) for x in request.split(b","))
        for i in range(n):
            if delay_ms:
                time.sleep(delay_ms[0] / 1000)
            yield pattern(i, size)

    def bidi(requests, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for message in requests:
            yield hashlib.sha256(message).digest()

    handler = grpc.method_handlers_generic_handler(GRPC_SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


async def bulk_server(port: int) -> None:
    """Protocol: client sends `DOWN <n> <seed>\\n`, then its upload until EOF (half-close); the
    server answers `<sha256 of upload>\\n` and then n bytes of pattern(seed, n), and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, n, seed = (await reader.readline()).split()
            h = hashlib.sha256()
            while chunk := await reader.read(1 << 18):
                h.update(chunk)
            writer.write(h.hexdigest().encode() + b"\n")
            data = memoryview(pattern(int(seed), int(n)))
            for off in range(0, len(data), 1 << 20):
                writer.write(data[off:off + (1 << 20)])
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    await server.serve_forever()


async def ws_server(port: int) -> None:
    import websockets

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "0.0.0.0", port, max_size=None):
        await asyncio.Future()


async def banner_server(port: int) -> None:
    """Server speaks first (SMTP-like): banner on accept, then one reply per line until QUIT."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(BANNER)
            await writer.drain()
            while line := await reader.readline():
                if line.strip().upper() == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                writer.write(b"250 ok " + line)
                await writer.drain()
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    await server.serve_forever()


def whoami_server(port: int) -> None:
    """Answers every GET with its pod's name, so a client sees which endpoint served it."""
    import http.server

    body = os.environ["POD_NAME"].encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


# ---------------------------------------------------------------------------- clients
def http_each(url: str, n: int) -> None:
    """n GETs, a fresh connection each (the agent picks a ClusterIP endpoint per connection):
    how many each body (a pod name) came back."""
    bodies: Counter[str] = Counter()
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=20) as resp:
            bodies[resp.read().decode()] += 1
    emit({"bodies": dict(bodies)})


def http1_client(host: str, port: int, plan: str) -> None:
    """plan: `path*count,...` on ONE keep-alive http.client connection, then one urllib request
    (a fresh connection, `Connection: close`) to the first path. Reports statuses and body sums."""
    conn = http.client.HTTPConnection(host, port, timeout=20)
    statuses: Counter[str] = Counter()
    sums: dict[str, str] = {}
    requests = 0
    for item in plan.split(","):
        path, _, count = item.partition("*")
        for _ in range(int(count or 1)):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            statuses[str(resp.status)] += 1
            sums[path] = hashlib.sha256(body).hexdigest()
            requests += 1
    conn.close()
    first = plan.split(",")[0].partition("*")[0]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{first}", timeout=20) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:  # 5xx raises; it is still a response
        status, body = err.code, err.read()
    statuses[str(status)] += 1
    requests += 1
    emit({"requests": requests, "statuses": dict(statuses), "sums": sums,
          "urllib_sum": hashlib.sha256(body).hexdigest()})


def grpc_client(target: str, unary_ok: int, unary_fail: int, stream_n: int, bidi_n: int) -> None:
    import grpc

    codes: Counter[str] = Counter()
    rpcs = 0
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        for i in range(unary_ok):
            assert unary(b"hello-%d" % i, timeout=20) == b"echo:hello-%d" % i
            codes["0"] += 1
            rpcs += 1
        for _ in range(unary_fail):
            try:
                unary(b"fail", timeout=20)
            except grpc.RpcError as err:
                codes[str(err.code().value[0])] += 1
            rpcs += 1
        stream = channel.unary_stream(f"/{GRPC_SERVICE}/ServerStream")
        got = list(stream(b"%d,%d" % (stream_n, 4096), timeout=30))
        assert got == [pattern(i, 4096) for i in range(stream_n)], "server stream corrupted"
        codes["0"] += 1
        rpcs += 1
        bidi = channel.stream_stream(f"/{GRPC_SERVICE}/Bidi")
        sent = [pattern(1000 + i, 1000 + i) for i in range(bidi_n)]
        replies = list(bidi(iter(sent), timeout=30))
        assert replies == [hashlib.sha256(m).digest() for m in sent], "bidi stream corrupted"
        codes["0"] += 1
        rpcs += 1
    emit({"rpcs": rpcs, "grpc_status": dict(codes)})


def grpc_stream_client(target: str, n: int, delay_ms: int) -> None:
    """One long server-streaming RPC (n messages, delay_ms apart): lives across an uninstall."""
    import grpc

    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stream = channel.unary_stream(f"/{GRPC_SERVICE}/ServerStream")
        got = list(stream(b"%d,%d,%d" % (n, 1024, delay_ms), timeout=120))
    emit({"messages": len(got), "intact": got == [pattern(i, 1024) for i in range(n)],
          "seconds": round(time.monotonic() - started, 2)})


def bulk_client(host: str, port: int, up: int, down: int, seed: int) -> None:
    header = b"DOWN %d %d\n" % (down, seed)
    upload = pattern(seed + 1, up)
    expect_down = hashlib.sha256(pattern(seed, down)).hexdigest()
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(header)
        s.sendall(upload)
        s.shutdown(socket.SHUT_WR)  # half-close: the server answers after our EOF
        buf = bytearray()
        while chunk := s.recv(1 << 20):
            buf += chunk
    line, _, body = bytes(buf).partition(b"\n")
    emit({
        "sent": len(header) + up, "received": len(buf), "seconds": round(time.monotonic() - started, 3),
        "up_ok": line.decode() == hashlib.sha256(upload).hexdigest(),
        "down_ok": len(body) == down and hashlib.sha256(body).hexdigest() == expect_down,
    })


async def ws_client(url: str, messages: int, size: int) -> None:
    import websockets

    ok = 0
    async with websockets.connect(url, max_size=None) as ws:
        for i in range(messages):
            data = pattern(i, size)
            await ws.send(data)
            ok += await ws.recv() == data
    emit({"messages": messages, "echoed_ok": ok})


def banner_client(host: str, port: int, lines: int) -> None:
    """Waits for the banner before sending anything (the agent must not wait for client bytes)."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        banner = f.readline()
        banner_s = time.monotonic() - started
        sent = 0
        replies = []
        for i in range(lines):
            line = b"HELO client-%d\r\n" % i
            s.sendall(line)
            sent += len(line)
            replies.append(f.readline())
        s.sendall(b"QUIT\r\n")
        sent += 6
        bye = f.readline()
        rest = f.read()
    received = len(banner) + sum(map(len, replies)) + len(bye) + len(rest)
    emit({"banner_ok": banner == BANNER, "banner_s": round(banner_s, 3), "sent": sent, "received": received,
          "replies_ok": replies == [b"250 ok HELO client-%d\r\n" % i for i in range(lines)] and bye == b"221 bye\r\n"})


def http_loop(url: str, stop_file: str, progress_file: str, reuse: bool = False) -> None:
    """Short HTTP/1.1 requests until stop_file exists (install/uninstall): a fresh connection each,
    or with `reuse` one keep-alive connection, re-dialled only after the server said
    `Connection: close` (what a draining agent asks for). progress_file gets `<ok> <failures>`
    after every request, so the test can wait for progress."""
    ok, failures = 0, []
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    conn: http.client.HTTPConnection | None = None
    while not os.path.exists(stop_file):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(name, int(port or 80), timeout=10)
            conn.request("GET", "/" + rest)
            resp = conn.getresponse()
            body = resp.read()
            if not reuse or resp.will_close:
                conn.close()
                conn = None
            if resp.status == 200 and body == b"ok\n":
                ok += 1
            else:
                failures.append(f"{time.time():.3f} status={resp.status} body={body[:40]!r}")
        except OSError as err:
            failures.append(f"{time.time():.3f} {type(err).__name__}: {err}")
            conn = None
        with open(progress_file + ".tmp", "w") as f:
            f.write(f"{ok} {len(failures)}\n")
        os.replace(progress_file + ".tmp", progress_file)
        time.sleep(0.01)
    emit({"ok": ok, "failures": failures})


def main(argv: list[str]) -> None:
    kind, args = argv[0], argv[1:]
    if kind == "grpc-server":
        grpc_server(int(args[0]))
    elif kind in ("bulk-server", "ws-server", "banner-server"):
        server = {"bulk-server": bulk_server, "ws-server": ws_server, "banner-server": banner_server}[kind]
        asyncio.run(server(int(args[0])))
    elif kind == "whoami-server":
        whoami_server(int(args[0]))
    elif kind == "http-each":
        http_each(args[0], int(args[1]))
    elif kind == "http1":
        http1_client(args[0], int(args[1]), args[2])
    elif kind == "grpc":
        grpc_client(args[0], *(int(a) for a in args[1:5]))
    elif kind == "grpc-stream":
        grpc_stream_client(args[0], int(args[1]), int(args[2]))
    elif kind == "bulk":
        bulk_client(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
    elif kind == "ws":
        asyncio.run(ws_client(args[0], int(args[1]), int(args[2])))
    elif kind == "banner":
        banner_client(args[0], int(args[1]), int(args[2]))
    elif kind == "http-loop":
        http_loop(args[0], args[1], args[2], reuse=args[3:] == ["reuse"])
    else:
        raise SystemExit(f"unknown peer kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

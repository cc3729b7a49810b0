"""Peers for the fault tests, run as sandbox pod processes (servers) or via `sandbox.exec` (clients).

    python3 faults_peers.py echo-server PORT
    python3 faults_peers.py grpc-server PORT        # grpcio, imported by the gRPC kinds only
    python3 faults_peers.py CLIENT-KIND ARGS...     # prints one JSON object: what it did and saw

Clients check every byte they get back (an echo of what they sent) and report counts of failures by
kind, so a test asserts "0 failed, bytes intact" and prints the timings. Stdlib only (asyncio on the
default loop) but for the gRPC kinds: a client starts fast in a pod.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 1 << 17)), hard))
    except (ValueError, OSError):
        pass


def _write_atomic(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed_early"
    return type(exc).__name__


# ---------------------------------------------------------------------------- servers
async def echo_server(*ports: int) -> None:
    """Echoes every byte until the client's EOF, then closes: each client line comes back as is.
    Backlog 8192 so the server's own queue is never what a connect storm measures."""
    raise_nofile()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

        def eof_received(self) -> bool:
            return False  # close once our echo is written

    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Echo, "0.0.0.0", port, backlog=8192, reuse_address=True) for port in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


# ---------------------------------------------------------------------------- clients
async def _one_echo(host: str, port: int, i: int, timeout: float, mode: str = "echo") -> tuple[float, float]:
    """Connect, send one line, read it back, close (`mode` "close": connect and close at once).
    Returns (seconds the connect took, seconds the whole exchange took)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    took = time.monotonic() - t0
    if mode == "close":
        writer.close()
        return took, took
    try:
        line = b"ping %d\n" % i
        writer.write(line)
        got = await asyncio.wait_for(reader.readexactly(len(line)), timeout)
        if got != line:
            raise ValueError(f"echo mismatch {got!r}")
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), timeout)
        if rest:
            raise ValueError(f"bytes after the echo {rest[:20]!r}")
    finally:
        writer.close()
    return took, time.monotonic() - t0


async def connects(host: str, port: int, n: int, concurrency: int, timeout: float, mode: str = "echo") -> None:
    """n connections, `concurrency` at a time, each one echo then close (client closes first), or
    with mode "close" connect and close at once. Reports failures by kind and the slow ones (a
    connect or an exchange over 1 s is a lost SYN: the kernel retries after 1 s)."""
    raise_nofile()
    sem = asyncio.Semaphore(concurrency)
    failed: Counter[str] = Counter()
    connect_s: list[float] = []
    exchange_s: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                c, e = await _one_echo(host, port, i, timeout, mode)
                connect_s.append(c)
                exchange_s.append(e)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                failed[failure_kind(exc)] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    connect_s.sort()
    exchange_s.sort()
    emit({"n": n, "mode": mode, "ok": len(connect_s), "failed": dict(failed),
          "seconds": round(time.monotonic() - started, 3),
          "connect_p50_ms": round(1000 * connect_s[len(connect_s) // 2], 2) if connect_s else None,
          "connect_max_s": round(connect_s[-1], 3) if connect_s else None,
          "exchange_max_s": round(exchange_s[-1], 3) if exchange_s else None,
          "connects_over_1s": sum(1 for s in connect_s if s > 1.0),
          "exchanges_over_1s": sum(1 for s in exchange_s if s > 1.0)})


def burst(host: str, port: int, n: int, timeout: float) -> None:
    """n connects started at the same instant (non-blocking sockets, one connect() call each, no
    waiting in between), then every connection echoes one line. Counts resets and timeouts."""
    raise_nofile()
    socks = []
    started = time.monotonic()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
    sent_s = time.monotonic() - started

    async def finish() -> Counter[str]:
        loop = asyncio.get_running_loop()
        failed: Counter[str] = Counter()

        async def one(i: int, s: socket.socket) -> None:
            try:
                await asyncio.wait_for(loop.sock_connect(s, (host, port)), timeout)
                line = b"burst %d\n" % i
                await loop.sock_sendall(s, line)
                got = b""
                while len(got) < len(line):
                    chunk = await asyncio.wait_for(loop.sock_recv(s, 64), timeout)
                    if not chunk:
                        raise asyncio.IncompleteReadError(got, len(line))
                    got += chunk
                if got != line:
                    raise ValueError("echo mismatch")
            except OSError as exc:
                if exc.errno == 106:  # EISCONN: already connected, which sock_connect reports oddly
                    return await one_connected(i, s)
                failed[failure_kind(exc)] += 1
            except Exception as exc:  # noqa: BLE001
                failed[failure_kind(exc)] += 1
            finally:
                s.close()

        async def one_connected(i: int, s: socket.socket) -> None:
            line = b"burst %d\n" % i
            try:
                await loop.sock_sendall(s, line)
                got = await asyncio.wait_for(loop.sock_recv(s, 64), timeout)
                if got != line:
                    raise ValueError("echo mismatch")
            except Exception as exc:  # noqa: BLE001
                failed[failure_kind(exc)] += 1

        await asyncio.gather(*(one(i, s) for i, s in enumerate(socks)))
        return failed

    failed = asyncio.run(finish())
    emit({"n": n, "ok": n - sum(failed.values()), "failed": dict(failed), "connect_calls_s": round(sent_s, 3),
          "seconds": round(time.monotonic() - started, 3)})


async def idle(host: str, port: int, n: int, concurrency: int, hold_file: str, timeout: float) -> None:
    """Opens n connections (concurrency at a time), checks each with one echo, writes
    `hold_file + ".open"` with the counts, keeps them all open and idle until hold_file exists,
    then checks each again with a second echo and closes them all."""
    raise_nofile()
    sem = asyncio.Semaphore(concurrency)
    failed: Counter[str] = Counter()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    started = time.monotonic()

    async def open_one(i: int) -> None:
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                line = b"idle %d\n" % i
                w.write(line)
                if await asyncio.wait_for(r.readexactly(len(line)), timeout) != line:
                    raise ValueError("echo mismatch")
                conns.append((r, w))
            except Exception as exc:  # noqa: BLE001
                failed[failure_kind(exc)] += 1

    await asyncio.gather(*(open_one(i) for i in range(n)))
    open_s = time.monotonic() - started
    _write_atomic(hold_file + ".open", {"open": len(conns), "failed": dict(failed), "seconds": round(open_s, 3)})
    while not os.path.exists(hold_file):
        await asyncio.sleep(0.2)
    second: Counter[str] = Counter()

    async def check(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async with sem:
            try:
                line = b"again %d\n" % i
                w.write(line)
                if await asyncio.wait_for(r.readexactly(len(line)), timeout) != line:
                    raise ValueError("echo mismatch")
            except Exception as exc:  # noqa: BLE001
                second[failure_kind(exc)] += 1
            finally:
                w.close()

    await asyncio.gather(*(check(i, r, w) for i, (r, w) in enumerate(conns)))
    emit({"n": n, "open": len(conns), "failed": dict(failed), "open_seconds": round(open_s, 3),
          "after_idle_failed": dict(second)})


async def hold(host: str, port: int, n: int, timeout: float) -> None:
    """Opens n connections one after another, each checked with an echo while the earlier ones stay
    open, then echoes once more on every one and closes them all."""
    failed: Counter[str] = Counter()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    ports: list[int] = []

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter, line: bytes) -> None:
        w.write(line)
        if await asyncio.wait_for(r.readexactly(len(line)), timeout) != line:
            raise ValueError("echo mismatch")

    started = time.monotonic()
    for i in range(n):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            ports.append(w.get_extra_info("sockname")[1])
            await echo(r, w, b"open %d\n" % i)
            conns.append((r, w))
        except Exception as exc:  # noqa: BLE001
            failed["open_" + failure_kind(exc)] += 1
    for i, (r, w) in enumerate(conns):
        try:
            await echo(r, w, b"again %d\n" % i)
        except Exception as exc:  # noqa: BLE001
            failed["again_" + failure_kind(exc)] += 1
        w.close()
    emit({"n": n, "ok": len(conns) - sum(v for k, v in failed.items() if k.startswith("again_")),
          "failed": dict(failed), "source_ports": ports, "seconds": round(time.monotonic() - started, 3)})


async def slowloris(host: str, port: int, n: int, max_s: float) -> None:
    """n connections each sending an endless HTTP/1 request head at one byte a second (1,000 new
    connections a second until all are open). Reports how each one ended: the first line the
    server side answered with, and after how long; "held" ones were still open at max_s."""
    raise_nofile()
    head = b"GET / HTTP/1.1\r\nHost: slow\r\n" + b"X-Slow: " + b"a" * 10_000
    ends: Counter[str] = Counter()
    seconds: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(i / 1000)
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except Exception as exc:  # noqa: BLE001
            ends["connect_" + failure_kind(exc)] += 1
            return
        answer = asyncio.ensure_future(reader.read())
        try:
            for byte in head:
                if answer.done() or time.monotonic() - t0 > max_s:
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)
            if not answer.done() and time.monotonic() - t0 <= max_s:
                await asyncio.wait_for(asyncio.shield(answer), max_s - (time.monotonic() - t0))
        except (TimeoutError, OSError):
            pass
        if answer.done() and answer.exception() is None:
            got = answer.result()
            ends[got.split(b"\r\n", 1)[0].decode("latin-1") or "closed"] += 1
            seconds.append(time.monotonic() - t0)
        elif answer.done():
            ends[failure_kind(answer.exception())] += 1  # type: ignore[arg-type]
            seconds.append(time.monotonic() - t0)
        else:
            answer.cancel()
            ends["held"] += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    seconds.sort()
    emit({"n": n, "ends": dict(ends), "seconds": round(time.monotonic() - started, 1),
          "ended_p50_s": round(seconds[len(seconds) // 2], 1) if seconds else None,
          "ended_max_s": round(seconds[-1], 1) if seconds else None})


async def http_load(host: str, port: int, path: str, connections: int, duration: float) -> None:
    """Closed-loop HTTP/1.1 keep-alive GETs on `connections` connections for `duration` seconds:
    requests per second, failures by kind, every body checked (nginx's "ok\n")."""
    raise_nofile()
    request = f"GET {path} HTTP/1.1\r\nHost: load\r\n\r\n".encode()
    ok = 0
    failed: Counter[str] = Counter()
    stop = time.monotonic() + duration

    async def conn() -> None:
        nonlocal ok
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            except Exception as exc:  # noqa: BLE001
                failed["connect_" + failure_kind(exc)] += 1
                await asyncio.sleep(0.1)
                continue
            try:
                while time.monotonic() < stop:
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    body = await asyncio.wait_for(reader.readexactly(length), 10)
                    if head.startswith(b"HTTP/1.1 200 ") and body == b"ok\n":
                        ok += 1
                    else:
                        failed[head.split(b"\r\n", 1)[0].decode("latin-1")] += 1
            except Exception as exc:  # noqa: BLE001
                failed[failure_kind(exc)] += 1
            finally:
                writer.close()

    started = time.monotonic()
    await asyncio.gather(*(conn() for _ in range(connections)))
    took = time.monotonic() - started
    emit({"ok": ok, "failed": dict(failed), "seconds": round(took, 2), "rps": round(ok / took, 1)})


async def victim(host: str, port: int, path: str, rate: float, connections: int, duration: float) -> None:
    """A steady, well-behaved pod: `rate` HTTP/1.1 GETs a second, paced (open loop: each request
    is due at its own time, so a stall shows as latency, not as fewer requests), spread over
    `connections` keep-alive connections. Reports success and latency percentiles; a request
    counts as ok when it got nginx's 200 "ok\n" within 10 s. A broken connection is reopened."""
    raise_nofile()
    request = f"GET {path} HTTP/1.1\r\nHost: victim\r\n\r\n".encode()
    latencies: list[float] = []
    failed: Counter[str] = Counter()
    interval = connections / rate
    started = time.monotonic()
    stop = started + duration

    async def conn(k: int) -> None:
        due = started + k * interval / connections
        writer = None
        while due < stop:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                body = await asyncio.wait_for(reader.readexactly(length), 10)
                if head.startswith(b"HTTP/1.1 200 ") and body == b"ok\n":
                    latencies.append(time.monotonic() - due)  # from when it was due: queueing counts
                else:
                    failed[head.split(b"\r\n", 1)[0].decode("latin-1")] += 1
            except Exception as exc:  # noqa: BLE001
                failed[failure_kind(exc)] += 1
                if writer is not None:
                    writer.close()
                writer = None
            due += interval
        if writer is not None:
            writer.close()

    await asyncio.gather(*(conn(k) for k in range(connections)))
    latencies.sort()
    n = len(latencies)
    pct = lambda q: round(1000 * latencies[min(n - 1, int(q * n))], 2) if n else None
    total = n + sum(failed.values())
    emit({"ok": n, "failed": dict(failed), "success": round(n / total, 4) if total else 0.0,
          "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0)})


async def connect_flood(host: str, port: int, path: str, concurrency: int, duration: float) -> None:
    """A misbehaving pod opening new connections as fast as it can: `concurrency` loops, each one
    connect, one GET with `Connection: close`, read to the end, close, again. Reports how many
    completed (200) and how the others ended (the mesh's 503 shed answer among them)."""
    raise_nofile()
    request = f"GET {path} HTTP/1.1\r\nHost: flood\r\nConnection: close\r\n\r\n".encode()
    ok = 0
    ends: Counter[str] = Counter()
    stop = time.monotonic() + duration

    async def loop() -> None:
        nonlocal ok
        while time.monotonic() < stop:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                writer.write(request)
                got = await asyncio.wait_for(reader.read(), 5)
                line = got.split(b"\r\n", 1)[0].decode("latin-1")
                if line.startswith("HTTP/1.1 200 "):
                    ok += 1
                else:
                    ends[line or "closed"] += 1
            except Exception as exc:  # noqa: BLE001
                ends[failure_kind(exc)] += 1
            finally:
                if writer is not None:
                    writer.close()

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    took = time.monotonic() - started
    emit({"ok": ok, "ends": dict(ends), "seconds": round(took, 2),
          "per_s": round((ok + sum(ends.values())) / took, 1)})


def wrk_flood(host: str, port: int, path: str, connections: int, duration: float, close: str) -> None:
    """wrk (C, one thread) as the aggressor: `connections` keep-alive connections sending requests
    back to back, or with close "close" a new connection for every request (`Connection: close`)."""
    import re
    import subprocess

    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--timeout", "5s"]
    if close == "close":
        argv += ["-H", "Connection: close"]
    out = subprocess.run([*argv, f"http://{host}:{port}{path}"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    requests = int(m.group(1)) if m else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    emit({"requests": requests, "rps": round(requests / duration, 1),
          "non_2xx": int(non2xx.group(1)) if non2xx else 0,
          "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
          if errors else {}})


async def many_hosts(host: str, port: int, n: int, connections: int) -> None:
    """n GETs with n distinct Host headers (h0.hosts.test ...), spread over keep-alive connections:
    every one a new `authority` label value on both agents."""
    ok = 0
    failed: Counter[str] = Counter()

    async def conn(k: int) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in range(k, n, connections):
                writer.write(f"GET /ok HTTP/1.1\r\nHost: h{i}.hosts.test\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200 "):
                    ok += 1
                else:
                    failed[head.split(b"\r\n", 1)[0].decode("latin-1")] += 1
        finally:
            writer.close()

    await asyncio.gather(*(conn(k) for k in range(connections)))
    emit({"ok": ok, "failed": dict(failed)})


def raw(host: str, port: int, payload_hex: str, idle_s: float) -> None:
    """Sends the bytes (hex; "-": read the hex from stdin), then reads until the other side closes
    or stays silent for idle_s. Reports what came back (hex) and how the connection ended."""
    if payload_hex == "-":
        payload_hex = sys.stdin.read().strip()
    got = b""
    end = "idle"
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(bytes.fromhex(payload_hex))
        s.settimeout(idle_s)
        try:
            while chunk := s.recv(65536):
                got += chunk
            end = "closed"
        except TimeoutError:
            end = "idle"
        except ConnectionResetError:
            end = "reset"
    emit({"got": got.hex(), "end": end})


async def longlived(host: str, echo_port: int, http_host: str, http_port: int, http_path: str, n_echo: int,
                    n_bulk: int, n_http: int, stop_file: str, progress_file: str, interval: float) -> None:
    """Long-lived connections that keep working until `stop_file` appears (an upgrade runs meanwhile):
    `n_echo` echo connections (a numbered line every `interval`, checked), `n_bulk` echo connections
    streaming a known byte sequence as fast as a 512 KB window allows (every byte checked), and
    `n_http` HTTP/1.1 keep-alive connections (a GET every `interval`, status and body checked). A
    connection never reconnects: any failure ends it and counts as cut. `progress_file` gets the
    rounds so far every 0.2 s."""
    failed: Counter[str] = Counter()
    rounds: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def echo_conn(i: int) -> None:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, echo_port), 10)
        seq = 0
        try:
            while True:
                last = stop.is_set()
                line = b"echo %d %d %s\n" % (i, seq, b"x" * (seq % 200))
                w.write(line)
                if await asyncio.wait_for(r.readexactly(len(line)), 10) != line:
                    raise ValueError("echo mismatch")
                rounds["echo"] += 1
                nbytes["echo"] += len(line)
                seq += 1
                if last:
                    break
                await asyncio.sleep(interval)
            w.write_eof()
            if await asyncio.wait_for(r.read(), 10) != b"":
                raise ValueError("bytes after the echo")
        except Exception as exc:  # noqa: BLE001
            failed["echo_" + failure_kind(exc)] += 1
        finally:
            w.close()

    async def bulk_conn(i: int) -> None:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, echo_port), 10)
        unacked = bytearray()
        window = 512 * 1024
        room = asyncio.Event()
        room.set()
        done_sending = asyncio.Event()

        async def send() -> None:
            n = 0
            while not stop.is_set():
                chunk = hashlib.sha256(b"%d/%d" % (i, n)).digest() * 1024  # 32 KB, known
                n += 1
                unacked.extend(chunk)
                w.write(chunk)
                await w.drain()
                if len(unacked) > window:
                    room.clear()
                    await room.wait()
            w.write_eof()
            done_sending.set()

        sender = asyncio.get_running_loop().create_task(send())
        try:
            while True:
                data = await asyncio.wait_for(r.read(1 << 16), 10)
                if not data:
                    break
                if data != unacked[:len(data)]:
                    raise ValueError("bulk mismatch")
                del unacked[:len(data)]
                nbytes["bulk"] += len(data)
                rounds["bulk"] += 1
                if len(unacked) <= window // 2:
                    room.set()
            if unacked or not done_sending.is_set():
                raise ValueError(f"bulk ended early, {len(unacked)} bytes not echoed")
        except Exception as exc:  # noqa: BLE001
            failed["bulk_" + failure_kind(exc)] += 1
            sender.cancel()
        finally:
            w.close()

    async def http_conn(i: int) -> None:
        r, w = await asyncio.wait_for(asyncio.open_connection(http_host, http_port), 10)
        request = f"GET {http_path} HTTP/1.1\r\nHost: {http_host}\r\nUser-Agent: longlived-{i}\r\n\r\n".encode()
        body0 = None
        try:
            while True:
                last = stop.is_set()
                w.write(request)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                status = int(head.split(b" ", 2)[1])
                length = next(int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length:"))
                body = await asyncio.wait_for(r.readexactly(length), 10)
                if status != 200 or b"connection: close" in head.lower():
                    raise ValueError(f"status {status}, head {head!r}")
                body0 = body if body0 is None else body0
                if body != body0:
                    raise ValueError("body changed")
                rounds["http"] += 1
                nbytes["http"] += len(head) + len(body)
                if last:
                    break
                await asyncio.sleep(interval)
        except Exception as exc:  # noqa: BLE001
            failed["http_" + failure_kind(exc)] += 1
        finally:
            w.close()

    async def report_progress() -> None:
        while not stop.is_set():
            _write_atomic(progress_file, {"rounds": dict(rounds), "failed": dict(failed)})
            if os.path.exists(stop_file):
                stop.set()
            await asyncio.sleep(0.2)

    started = time.monotonic()
    progress = asyncio.get_running_loop().create_task(report_progress())
    tasks = ([echo_conn(i) for i in range(n_echo)] + [bulk_conn(i) for i in range(n_bulk)]
             + [http_conn(i) for i in range(n_http)])
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            failed["open_" + failure_kind(res)] += 1
    await progress
    emit({"echo": n_echo, "bulk": n_bulk, "http": n_http, "rounds": dict(rounds), "bytes": dict(nbytes),
          "failed": dict(failed), "cut": sum(failed.values()), "seconds": round(time.monotonic() - started, 3)})


def grpc_server(port: int) -> None:
    """gRPC (grpcio, imported only here): `faults.Echo/Chat` echoes every message of a bidirectional
    stream until the client ends it; `faults.Echo/Unary` echoes one."""
    from concurrent import futures

    import grpc

    def chat(requests, context):  # type: ignore[no-untyped-def]
        for request in requests:
            yield b"echo:" + request

    def unary(request: bytes, context: object) -> bytes:
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler("faults.Echo", {
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def grpc_longlived(target: str, n_streams: int, stop_file: str, progress_file: str, interval: float) -> None:
    """On one channel (one HTTP/2 connection, as grpcio keeps it): `n_streams` bidirectional streams,
    a numbered message every `interval` each, every echo checked in order, ended by the client once
    `stop_file` appears; and a unary call every `interval` meanwhile. Any error is reported: a
    stream cut by the mesh ends with UNAVAILABLE."""
    import threading

    import grpc

    channel = grpc.insecure_channel(target)
    chat = channel.stream_stream("/faults.Echo/Chat")
    unary = channel.unary_unary("/faults.Echo/Unary")
    echoed = [0] * n_streams
    unary_ok = [0]
    errors: list[str] = []

    def messages(i: int):  # type: ignore[no-untyped-def]
        n = 0
        while not os.path.exists(stop_file):
            yield b"stream %d message %d" % (i, n)
            n += 1
            time.sleep(interval)

    def run_stream(i: int) -> None:
        try:
            for n, reply in enumerate(chat(messages(i), timeout=600)):
                if reply != b"echo:stream %d message %d" % (i, n):
                    raise ValueError(f"stream {i}: {reply!r} as reply {n}")
                echoed[i] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"stream {i}: {exc!r}"[:300])

    threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    started = time.monotonic()
    while not os.path.exists(stop_file):
        try:
            if unary(b"u", timeout=10) != b"echo:u":
                raise ValueError("unary mismatch")
            unary_ok[0] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"unary: {exc!r}"[:300])
        _write_atomic(progress_file, {"echoed": sum(echoed), "unary": unary_ok[0]})
        time.sleep(interval)
    for t in threads:
        t.join(60)
    emit({"streams": n_streams, "echoed": echoed, "unary": unary_ok[0], "errors": errors,
          "seconds": round(time.monotonic() - started, 3)})


def main(argv: list[str]) -> None:
    kind, args = argv[0], argv[1:]
    if kind == "echo-server":
        asyncio.run(echo_server(*(int(p) for p in args[0].split(","))))
    elif kind == "connects":
        asyncio.run(connects(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]), *args[5:]))
    elif kind == "burst":
        burst(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif kind == "hold":
        asyncio.run(hold(args[0], int(args[1]), int(args[2]), float(args[3])))
    elif kind == "slowloris":
        asyncio.run(slowloris(args[0], int(args[1]), int(args[2]), float(args[3])))
    elif kind == "http-load":
        asyncio.run(http_load(args[0], int(args[1]), args[2], int(args[3]), float(args[4])))
    elif kind == "victim":
        asyncio.run(victim(args[0], int(args[1]), args[2], float(args[3]), int(args[4]), float(args[5])))
    elif kind == "connect-flood":
        asyncio.run(connect_flood(args[0], int(args[1]), args[2], int(args[3]), float(args[4])))
    elif kind == "wrk":
        wrk_flood(args[0], int(args[1]), args[2], int(args[3]), float(args[4]), args[5])
    elif kind == "many-hosts":
        asyncio.run(many_hosts(args[0], int(args[1]), int(args[2]), int(args[3])))
    elif kind == "raw":
        raw(args[0], int(args[1]), args[2], float(args[3]))
    elif kind == "grpc-server":
        grpc_server(int(args[0]))
    elif kind == "grpc-longlived":
        grpc_longlived(args[0], int(args[1]), args[2], args[3], float(args[4]))
    elif kind == "longlived":
        asyncio.run(longlived(args[0], int(args[1]), args[2], int(args[3]), args[4], int(args[5]), int(args[6]),
                              int(args[7]), args[8], args[9], float(args[10])))
    elif kind == "idle":
        asyncio.run(idle(args[0], int(args[1]), int(args[2]), int(args[3]), args[4], float(args[5])))
    else:
        raise SystemExit(f"unknown peer kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

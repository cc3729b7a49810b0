"""A pod program for the churn tests: steady load on long-lived connections, and its own records.

    churn_client.py --http HOST:PORT --http-rate R --http-conns K
                    [--grpc HOST:PORT --grpc-rate RG] --duration S --out FILE

Started by the kubelet like any app: its first connections open as soon as the pod runs, racing
the mesh's identity for the pod (issue 10's case). HTTP/1.1: K keep-alive connections, each
sending its share of R requests per second one after another (request i of a connection is due at
start + i * K / R; a late one goes at once), reconnecting after `Connection: close`, an error, or
M requests (`--http-max-requests`: new connections keep coming, so new replicas get their share).
gRPC: one long-lived channel (grpcio), unary stat.Echo/Get calls at RG per second from a few
threads (several calls in flight on the one HTTP/2 connection), `wait_for_ready` so a call waits
for the channel to reconnect instead of failing while it does.

A kept-alive connection the other side closed is not reused (checked before each request); a
request sent on one that was closed meanwhile (no byte of an answer) is retried once on a new
connection, as HTTP clients do, and recorded as `stale` (the client cannot know whether a proxy
counted it). Every other attempt is recorded, once the request went out: times (epoch s), the HTTP status or gRPC
code, the replica (`x-pod`), latency to the response head (HTTP: the kernel's arrival stamp of
its first byte), or the error. FILE is written once, at the end (then the program idles so the pod
stays Running: a restart would send a second round).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@ll")


class HttpConn:
    def __init__(self, host: str, port: int, max_requests: int) -> None:
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.max_requests = max_requests
        self.served = 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf, self.served = None, b"", 0

    def _recv(self) -> tuple[bytes, float | None]:
        assert self.sock is not None
        data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
        stamp = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack(payload[:TIMESPEC.size])
                stamp = sec + nsec / 1e9
        return data, stamp

    def closed_by_peer(self) -> bool:
        """Has the other side closed this idle kept-alive connection? (Go's and urllib3's check.)"""
        assert self.sock is not None
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:
            return True

    def request(self, host_header: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": "http"}
        if self.sock is not None and self.closed_by_peer():
            self.close()
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=10)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rec["start"] = time.time()
        self.sock.sendall(f"GET /churn HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode())
        first: float | None = None
        while b"\r\n\r\n" not in self.buf:
            data, stamp = self._recv()
            if not data:
                raise ConnectionError("closed before the response head")
            if first is None:
                first = stamp or time.time()
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            data, _ = self._recv()
            if not data:
                raise ConnectionError("closed in the body")
            rest += data
        self.buf = rest[length:]
        rec.update(end=time.time(), status=int(lines[0].split()[1]), pod=headers.get("x-pod", ""),
                   latency_ms=((first or time.time()) - rec["start"]) * 1000.0)
        self.served += 1
        if headers.get("connection", "").lower() == "close" or self.served >= self.max_requests:
            self.close()
        return rec


def http_worker(addr: str, host_header: str, rate: float, index: int, conns: int, max_requests: int,
                until: float, out: list[dict[str, Any]]) -> None:
    host, _, port = addr.rpartition(":")
    conn = HttpConn(host, int(port), max_requests)
    interval = conns / rate
    due = time.time() + index * interval / conns
    while due < until:
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        for attempt in (1, 2):
            reused = conn.sock is not None and conn.served > 0
            try:
                out.append(conn.request(host_header))
            except OSError as exc:
                sent = conn.sock is not None
                stale = reused and isinstance(exc, ConnectionError) and "before the response head" in str(exc)
                conn.close()
                if stale and attempt == 1:
                    # A kept-alive connection the other side closed while we sent: retry once on a
                    # new connection, as HTTP clients do (urllib3, Go). Whether anyone saw the
                    # first attempt, we cannot know: it is recorded as `stale`.
                    out.append({"kind": "http", "start": due, "end": time.time(), "stale": True})
                    continue
                if sent:  # the request may have gone out: it is an attempt either way
                    out.append({"kind": "http", "start": due, "end": time.time(), "error": repr(exc)})
            break
        due += interval


def grpc_worker(addr: str, rate: float, calls_in_flight: int, until: float, out: list[dict[str, Any]]) -> None:
    """`calls_in_flight` threads share the one channel, each calling at rate / calls_in_flight."""
    import grpc

    with grpc.insecure_channel(addr) as channel:
        call = channel.unary_unary("/stat.Echo/Get")

        def caller(index: int) -> None:
            interval = calls_in_flight / rate
            due = time.time() + index * interval / calls_in_flight
            while due < until:
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                rec: dict[str, Any] = {"kind": "grpc", "start": time.time()}
                try:
                    call(b"churn", timeout=10, wait_for_ready=True)
                    rec["code"] = 0
                except grpc.RpcError as err:
                    rec["code"] = err.code().value[0]
                rec["end"] = time.time()
                rec["latency_ms"] = (rec["end"] - rec["start"]) * 1000.0
                out.append(rec)
                due += interval

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(calls_in_flight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http", default="")
    p.add_argument("--host", default="server")
    p.add_argument("--http-rate", type=float, default=20.0)
    p.add_argument("--http-conns", type=int, default=4)
    p.add_argument("--http-max-requests", type=int, default=10)
    p.add_argument("--grpc", default="")
    p.add_argument("--grpc-rate", type=float, default=6.0)
    p.add_argument("--grpc-in-flight", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = time.time()
    until = started + args.duration
    records: list[dict[str, Any]] = []
    threads = []
    if args.http:
        for i in range(args.http_conns):
            threads.append(threading.Thread(target=http_worker, args=(
                args.http, args.host, args.http_rate, i, args.http_conns, args.http_max_requests, until, records)))
    if args.grpc:
        threads.append(threading.Thread(target=grpc_worker, args=(args.grpc, args.grpc_rate, args.grpc_in_flight,
                                                                  until, records)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pod": os.environ.get("POD_NAME", ""), "started": started, "records": records}))
    tmp.rename(out)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()

"""A debugging Observer that appends every observation as one JSON line to a file.

Used by the integration tests (and by a person debugging a node) to see exactly what the
traffic path reported; it is added next to the real telemetry, never instead of it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nodemesh.agent.observe import (
    ALL_HEADERS,
    ConnectionEnd,
    ConnectionMeta,
    HeadersGate,
    Observer,
    RequestEnd,
    RequestHead,
)


class JsonlObserver:
    # It writes no headers, but it writes body byte counts, which the HTTP/1 classifier keeps
    # only while details are wanted (agent/http1.py): a debugging aid may pay for them.
    headers_gate: HeadersGate = ALL_HEADERS

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()

    def _write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def connection_open(self, meta: ConnectionMeta) -> Any:
        conn = f"{self._pid}/{meta.conn_id}"
        self._write({"ev": "open", "conn": conn, "direction": meta.direction, "source": list(meta.source),
                     "original_destination": list(meta.original_destination),
                     "destination": list(meta.destination), "protocol": meta.protocol, "sni": meta.sni,
                     "adopted": meta.adopted})
        return conn

    def connection_endpoint(self, conn: Any, endpoint: tuple[str, int]) -> None:
        self._write({"ev": "endpoint", "conn": conn, "endpoint": list(endpoint)})

    def connection_secured(self, conn: Any, peer_id: str | None) -> None:
        self._write({"ev": "secured", "conn": conn, "peer_id": peer_id})

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self._write({"ev": "close", "conn": conn, "read_bytes": end.read_bytes,
                     "write_bytes": end.write_bytes, "error": end.error,
                     "handed_over": end.handed_over})

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        req = f"{conn}/{head.stream_id}"
        self._write({"ev": "request", "conn": conn, "req": req, "method": head.method,
                     "authority": head.authority, "path": head.path, "grpc": head.grpc,
                     "adopted": head.adopted})
        return req

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        self._write({"ev": "response", "req": req, "status": status})

    def request_end(self, req: Any, end: RequestEnd) -> None:
        self._write({"ev": "end", "req": req, "grpc_status": end.grpc_status, "reset_error": end.reset_error,
                     "request_bytes": end.request_bytes, "response_bytes": end.response_bytes})


class _EitherGate:
    __slots__ = ("a", "b")

    def __init__(self, a: HeadersGate, b: HeadersGate) -> None:
        self.a, self.b = a, b

    @property
    def headers_wanted(self) -> bool:
        return self.a.headers_wanted or self.b.headers_wanted


class TeeObserver:
    """Reports to two observers; handles are pairs."""

    def __init__(self, first: Observer, second: Observer) -> None:
        self.a = first
        self.b = second
        self.headers_gate: HeadersGate = _EitherGate(first.headers_gate, second.headers_gate)

    def connection_open(self, meta: ConnectionMeta) -> Any:
        return (self.a.connection_open(meta), self.b.connection_open(meta))

    def connection_endpoint(self, conn: Any, endpoint: tuple[str, int]) -> None:
        self.a.connection_endpoint(conn[0], endpoint)
        self.b.connection_endpoint(conn[1], endpoint)

    def connection_secured(self, conn: Any, peer_id: str | None) -> None:
        self.a.connection_secured(conn[0], peer_id)
        self.b.connection_secured(conn[1], peer_id)

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.a.connection_close(conn[0], end)
        self.b.connection_close(conn[1], end)

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        return (self.a.request_start(conn[0], head), self.b.request_start(conn[1], head))

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        self.a.response_start(req[0], status, headers, at)
        self.b.response_start(req[1], status, headers, at)

    def request_end(self, req: Any, end: RequestEnd) -> None:
        self.a.request_end(req[0], end)
        self.b.request_end(req[1], end)

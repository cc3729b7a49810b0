"""The seam between the traffic path and telemetry (metrics, tap) inside the agent.

Protocol handlers (`detect`, `http1`, `http2`, `tcp`, ...) describe *what happened* by calling
an `Observer`; they never touch metrics or tap state directly. The telemetry side implements
`Observer` (counting in plain Python, tap fan-out only when a tap is open). Every method is
called on the worker's event loop thread and must be cheap: no I/O, no locks, no logging.

Lifecycle, per accepted connection:
    conn = observer.connection_open(meta)             # once, after the upstream is chosen
    observer.connection_endpoint(conn, (ip, port))    # optional: the real endpoint, learned later
    observer.connection_secured(conn, peer_id)        # optional: its mTLS tunnel state changed
    for every request on it (HTTP/1 keep-alive, every HTTP/2 stream):
        req = observer.request_start(conn, RequestHead)
        observer.response_start(req, status, headers)  # may be skipped (reset before headers)
        observer.request_end(req, RequestEnd)          # exactly once per request_start
    observer.connection_close(conn, ConnectionEnd)     # exactly once
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class ConnectionMeta:
    conn_id: int                      # unique within the worker process
    direction: str                    # "outbound" (caught leaving a local pod) | "inbound"
    source: tuple[str, int]           # the calling pod's address (peer of the accepted socket)
    original_destination: tuple[str, int]  # what the caller dialled (pod IP or ClusterIP)
    destination: tuple[str, int]      # the endpoint actually connected to (pod chosen for a ClusterIP)
    protocol: str = "tcp"             # "http1" | "http2" | "tcp" | "tls" (opaque, SNI known)
    sni: str | None = None
    started: float = 0.0              # time.monotonic() at accept
    # The pod kube-proxy chose when the agent had to dial an address it could not resolve (a
    # ClusterIP it did not know yet), learned from conntrack after connecting; None otherwise.
    endpoint: tuple[str, int] | None = None
    # time.monotonic() when the client's first bytes reached the agent, if they had to wait (for
    # the upstream connection, or for the connection's identity: then the accept time): the first
    # request's latency counts from there, as the client's does. 0.0 otherwise.
    first_bytes_at: float = 0.0
    # Taken over from a draining agent (agent/handover.py): opened there, so not counted as a new
    # connection here (tcp_open_total); it joins this agent's open connections.
    adopted: bool = False
    # mTLS (agent/tunnel.py): the peer's SPIFFE ID from its verified certificate (inbound: the
    # client's, outbound: the server's); None when the connection is not inside a tunnel.
    mtls: str | None = None


@dataclass(slots=True)
class RequestHead:
    method: str
    scheme: str                       # "http" (no TLS termination here)
    authority: str                    # Host / :authority
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)  # only read when a tap matches
    grpc: bool = False                # content-type application/grpc*
    stream_id: int = 0                # HTTP/2 stream id; HTTP/1: ordinal of the request on the conn
    started: float = 0.0              # time.monotonic() when the request head was complete
    # In flight when its connection was taken over from a draining agent (agent/handover.py):
    # counted there (request_total; its response latency too if `status`, the response head that
    # agent saw, is set), ended and counted here.
    adopted: bool = False
    status: int = 0
    # HTTP/1 passes its own request object (http1.Http1Request, a subclass) as the head; an
    # observer may keep it until request_end, and must not mutate a RequestEnd it is given.


@dataclass(slots=True)
class RequestEnd:
    grpc_status: int | None = None    # from trailers or a trailers-only response
    reset_error: str | None = None    # RST_STREAM/GOAWAY code name, or "connection closed"
    request_bytes: int = 0            # body bytes from the client
    response_bytes: int = 0           # body bytes to the client
    ended: float = 0.0                # time.monotonic(); 0.0: now (HTTP/1 shares one clean end)


@dataclass(slots=True)
class ConnectionEnd:
    read_bytes: int                   # bytes read from the client (tcp_read_bytes_total)
    write_bytes: int                  # bytes written to the client (tcp_write_bytes_total)
    ended: float = 0.0                # time.monotonic()
    error: str | None = None
    # Handed to a newer agent (agent/handover.py), which carries on and counts its close: here its
    # bytes so far are counted and it leaves the open connections, but it did not close.
    handed_over: bool = False


class HeadersGate(Protocol):
    """Whether anything could read a request's details now: header lists and body byte counts
    (an open tap; the event log). While not, the HTTP/1 path neither decodes nor collects headers
    (most of the per-request Python work) and hands no body chunk to Python (agent/http1.py)."""

    @property
    def headers_wanted(self) -> bool: ...


class _Gate:
    __slots__ = ("headers_wanted",)

    def __init__(self, wanted: bool) -> None:
        self.headers_wanted = wanted


ALL_HEADERS: HeadersGate = _Gate(True)   # parsers used on their own (tests, tools): collect all
NO_HEADERS: HeadersGate = _Gate(False)


class Observer(Protocol):
    # Read by the HTTP/1 classifier at each message start (attribute reads only, no call).
    @property
    def headers_gate(self) -> HeadersGate: ...

    def connection_open(self, meta: ConnectionMeta) -> Any: ...

    def connection_endpoint(self, conn: Any, endpoint: tuple[str, int]) -> None: ...

    def connection_secured(self, conn: Any, peer_id: str | None) -> None: ...

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None: ...

    def request_start(self, conn: Any, head: RequestHead) -> Any: ...

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None: ...

    def request_end(self, req: Any, end: RequestEnd) -> None: ...

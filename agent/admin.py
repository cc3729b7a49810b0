"""The agent's admin endpoints on :4191 (SO_REUSEPORT so a new agent can bind while the old drains).

/metrics  Prometheus text from the node's merged counters (custom collector, its own registry)
/ready    200 once the agent serves traffic, 503 otherwise (and from drain start)
/live     200 while the event loop answers
/capture  {"excluded_ips": [...], "synced": bool}: this node's pod IPs the redirector must not capture,
          and whether that list is real yet (the agent has had its identity since it started): a
          redirector installs capture only from a synced list (docs/architecture.md, "The mesh
          never depends on itself")

A few GETs a second from probes and scrapers do not need a web framework: the server is an
asyncio.Protocol with httptools (already the data path's parser), HTTP/1.1 keep-alive included.
It replaced aiohttp, which cost the parent process about 9 MB of memory for four fixed routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable

import httptools
from nodemesh.agent.metrics import Snapshot
from nodemesh.agent.metrics_export import SnapshotCollector
from nodemesh.agent.procstats import AgentProcessCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("nodemesh.agent.admin")

MAX_REQUEST_BYTES = 64 * 1024  # probes and scrapes are tiny; anything bigger is not for us
MAX_WRITE_BUFFER = 256 * 1024   # answers the client has not read yet: past this it is cut off
REQUEST_TIMEOUT_S = 15.0        # a connection must complete a request this often (idle, slowloris)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 503: "Service Unavailable"}
Response = tuple[int, str, bytes]  # status, content type, body
TEXT = "text/plain; charset=utf-8"


class _AdminProtocol(asyncio.Protocol):
    """One admin connection: parse requests with httptools, answer each when its message is complete."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.received = 0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _arm_timer(self) -> None:
        # Idle keep-alive connections and heads that never end would otherwise hold the parent's
        # fds for good.
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_REQUEST_BYTES:
            self._send(413, TEXT, b"request too large\n", keep_alive=False)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(400, TEXT, b"no upgrades here\n", keep_alive=False)
        except httptools.HttpParserError:
            self._send(400, TEXT, b"bad request\n", keep_alive=False)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.received = 0
        t = self.transport
        if t is None or t.is_closing():
            return  # the rest of a pipelined read after we gave up on the client
        if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # Pipelining without reading the answers: they would pile up in our memory.
            t.abort()
            return
        self._arm_timer()
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        if method not in (b"GET", b"HEAD"):
            self._send(405, TEXT, b"method not allowed\n", keep_alive)
            return
        path = httptools.parse_url(self.url).path.decode("latin-1")
        try:
            status, ctype, body = self.server.route(path)
        except Exception:  # a broken collector must not take the admin port down with it
            log.exception("event=admin_handler_failed path=%s", path)
            status, ctype, body = 500, TEXT, b"internal error\n"
        self._send(status, ctype, b"" if method == b"HEAD" else body, keep_alive, len(body))

    def _send(self, status: int, ctype: str, body: bytes, keep_alive: bool, length: int | None = None) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n")
        t.write(head.encode("latin-1") + body)
        if not keep_alive:
            t.close()


class AdminServer:
    def __init__(self, host: str, port: int, *, snapshot: Callable[[], Snapshot],
                 ready: Callable[[], bool], excluded_ips: Callable[[], list[str]],
                 capture_installed: Callable[[], bool] = lambda: False,
                 identity_synced: Callable[[], bool] = lambda: True) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._excluded_ips = excluded_ips
        self._identity_synced = identity_synced
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self.registry.register(AgentProcessCollector(capture_installed))
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_AdminProtocol] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.get_running_loop().create_server(lambda: _AdminProtocol(self), sock=sock)
        if self.port == 0:  # tests bind an ephemeral port: learn which one
            self.port = sock.getsockname()[1]
        log.info("event=admin_listening addr=%s:%d", self.host, self.port)

    def stop_listening(self) -> None:
        """Stop accepting at once (drain start): a new agent's admin takes the port's probes."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.connections.clear()

    def route(self, path: str) -> Response:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/ready":
            if self._ready():
                return 200, TEXT, b"ready\n"
            return 503, TEXT, b"not ready\n"
        if path == "/live":
            return 200, TEXT, b"live\n"
        if path == "/capture":
            return 200, "application/json", json.dumps({"excluded_ips": self._excluded_ips(),
                                                        "synced": self._identity_synced()}).encode()
        return 404, TEXT, b"404: Not Found\n"

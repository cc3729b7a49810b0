"""The agent's admin endpoints on :4191 (SO_REUSEPORT so a new agent can bind while the old drains).

/metrics  Prometheus text from the node's merged counters (custom collector, its own registry);
          callers on the node's own addresses, or presenting `Authorization: Bearer <token>` that
          the controller accepts for Metrics (agent/scrapeauth.py): else 401/403 (503: can't check)
/ready    200 once the agent serves traffic, 503 otherwise (and from drain start)   - open (kubelet)
/live     200 while the event loop answers                                        - open (kubelet)
/capture  {"excluded_ips": [...], "synced": bool, "capture_mode": "iptables"|"ebpf", "capture_mode_reason": str}: this node's pod IPs the redirector must not capture,
          and whether that list is real yet (the agent has had its identity since it started): a
          redirector installs capture only from a synced list (docs/architecture.md, "The mesh
          never depends on itself")                                   - the node's own addresses only
/identity {"epoch", "version", "resource_version", "pods": {ip: pod uid}}: the identity held
                                                                      - as /metrics

"The node's own addresses": loopback, or an address of the network namespace the agent runs in
(the node's, on the host network). A pod's connection comes from its pod IP and cannot complete a
handshake from a node address (the answer would stay on the node), so this cannot be forged.

A few GETs a second from probes and scrapers do not need a web framework: the server is an
asyncio.Protocol with httptools (already the data path's parser), HTTP/1.1 keep-alive included.
It replaced aiohttp, which cost the parent process about 9 MB of memory for four fixed routes.

/ready and /metrics never wait for each other: /metrics is rendered in a thread from a snapshot
taken on the loop (one render at a time, shared by the scrapes that arrive meanwhile), so the loop
keeps answering probes while the text is built. Rendered on the loop, a 365 MB /metrics took 20.5 s
and /ready 1.5-2 s meanwhile: the redirector, whose probe gives up after 500 ms, took the node's
capture out 17 times in 60 s (issue 12). Answers on one connection still go out in request order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httptools
from nodemesh.agent.metrics import ALL_METRICS, Snapshot
from nodemesh.agent.metrics_export import SnapshotCollector
from nodemesh.agent.procstats import AgentProcessCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("nodemesh.agent.admin")

MAX_REQUEST_BYTES = 64 * 1024  # probes and scrapes are tiny; anything bigger is not for us
MAX_WRITE_BUFFER = 256 * 1024   # answers the client has not read yet: past this it is cut off
ADMIN_BACKLOG = 1024           # probes + scrapes; create_server is told too (its default is 100)
REQUEST_TIMEOUT_S = 15.0        # a connection must complete a request this often (idle, slowloris)
SLOW_RENDER_S = 0.1             # a /metrics render that took longer is reused for as long (metrics())
RENDER_CHUNK = 1000             # series rendered per piece of /metrics
MAX_QUEUED = 64                 # answers a pipelining client may have outstanding before it is cut off
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 503: "Service Unavailable"}
LOCAL_ONLY = frozenset({"/capture"})  # the node's own redirector's endpoint
GATED = frozenset({"/metrics", "/identity"})  # off the node: only with a credential
LOCAL_CACHE_S = 10.0
Response = tuple[int, str, "bytes | list[bytes]"]  # status, content type, body (or its pieces)
Queued = tuple["asyncio.Future[Response] | Response", bool, bool]  # answer, HEAD?, keep-alive?
TEXT = "text/plain; charset=utf-8"


class _AdminProtocol(asyncio.Protocol):
    """One admin connection: parse requests with httptools, answer each when its message is complete."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.authorization = b""
        self.local = False
        self.received = 0
        self.timer: asyncio.TimerHandle | None = None
        self.queue: deque[Queued] = deque()   # answers in request order, some still being rendered

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = self.server.is_local(transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        self.server.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.queue.clear()
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
        self.authorization = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.authorization = value

    def on_message_complete(self) -> None:
        self.received = 0
        t = self.transport
        if t is None or t.is_closing():
            return  # the rest of a pipelined read after we gave up on the client
        if t.get_write_buffer_size() > MAX_WRITE_BUFFER or len(self.queue) >= MAX_QUEUED:
            # Pipelining without reading the answers: they would pile up in our memory.
            t.abort()
            return
        if self.timer is not None:  # a request is being answered: not idle
            self.timer.cancel()
            self.timer = None
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        answer: asyncio.Future[Response] | Response
        if method not in (b"GET", b"HEAD"):
            answer = (405, TEXT, b"method not allowed\n")
        else:
            path = httptools.parse_url(self.url).path.decode("latin-1")
            if path in GATED and not self.local:
                answer = self.server.gated(path, self.authorization)
            elif path == "/metrics":
                answer = self.server.metrics()
            elif path in LOCAL_ONLY and not self.local:
                answer = (403, TEXT, f"{path} is only for this node's own processes\n".encode())
            else:
                try:
                    answer = self.server.route(path)
                except Exception:  # a broken handler must not take the admin port down with it
                    log.exception("event=admin_handler_failed path=%s", path)
                    answer = (500, TEXT, b"internal error\n")
        self.queue.append((answer, method == b"HEAD", keep_alive))
        if isinstance(answer, asyncio.Future) and not answer.done():
            answer.add_done_callback(lambda _f: self._flush())
        self._flush()

    def _flush(self) -> None:
        """Write the answers that are ready, in request order."""
        queue = self.queue
        while queue:
            answer, head_only, keep_alive = queue[0]
            if isinstance(answer, asyncio.Future):
                if not answer.done():
                    return
                response = answer.result() if answer.exception() is None else (500, TEXT, b"internal error\n")
            else:
                response = answer
            queue.popleft()
            status, ctype, body = response
            length = len(body) if isinstance(body, bytes) else sum(map(len, body))
            self._send(status, ctype, b"" if head_only else body, keep_alive, length)
        t = self.transport
        if t is not None and not t.is_closing():
            self._arm_timer()

    def _send(self, status: int, ctype: str, body: bytes | list[bytes], keep_alive: bool,
              length: int | None = None) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        challenge = 'WWW-Authenticate: Bearer realm="nodemesh-agent"\r\n' if status == 401 else ""
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n{challenge}"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n").encode("latin-1")
        if isinstance(body, bytes):
            t.write(head + body)
        else:
            t.writelines([head, *body])
        if not keep_alive:
            t.close()
            self.queue.clear()


def _bindable(ip: str) -> bool:
    """Only an address of this network namespace can be bound without IP_FREEBIND/TRANSPARENT."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def _nonlocal_bind() -> bool:
    """net.ipv4.ip_nonlocal_bind=1 makes every bind succeed: then only peer == our address counts."""
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


class _Families(Collector):
    """The families of `name` only, from a (partial) snapshot."""

    def __init__(self, snap: Snapshot, name: str) -> None:
        self._collector = SnapshotCollector(lambda: snap)
        self._index = list(ALL_METRICS).index(name)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        for i, family in enumerate(self._collector.collect()):
            if i == self._index:
                yield family


class AdminServer:
    def __init__(self, host: str, port: int, *, snapshot: Callable[[], Snapshot],
                 ready: Callable[[], bool], excluded_ips: Callable[[], list[str]],
                 capture_installed: Callable[[], bool] = lambda: False,
                 identity: Callable[[], dict[str, Any]] = dict,
                 identity_synced: Callable[[], bool] = lambda: True,
                 scrape_auth: Callable[[str | None], Awaitable[tuple[int, str]]] | None = None) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._excluded_ips = excluded_ips
        self._snapshot = snapshot
        self._process = AgentProcessCollector(capture_installed)
        self._rendering: asyncio.Future[Response] | None = None
        self._reuse_until = 0.0
        self._identity = identity
        self._identity_synced = identity_synced
        # None: no controller to ask (a standalone agent, tests): /metrics is open to every caller.
        self.scrape_auth = scrape_auth
        self._local: dict[str, tuple[float, bool]] = {}
        self._nonlocal_bind = _nonlocal_bind()
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_AdminProtocol] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(ADMIN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.get_running_loop().create_server(lambda: _AdminProtocol(self), sock=sock,
                                                                       backlog=ADMIN_BACKLOG)
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

    def metrics(self) -> asyncio.Future[Response]:
        """The /metrics answer: the render in progress if there is one (scrapes that arrive while it
        runs share it), else a new one. The snapshot is taken here, on the loop (the telemetry
        side's data is only ever touched there); the text is built in a thread."""
        loop = asyncio.get_running_loop()
        rendering = self._rendering
        if rendering is not None and (not rendering.done() or loop.time() < self._reuse_until):
            return rendering
        snap = self._snapshot()
        started = loop.time()
        rendering = self._rendering = loop.run_in_executor(None, self._render, snap)

        def rendered(_f: object) -> None:
            # A slow render is shared for as long as it took: scrapers back to back then keep the
            # render thread, which competes with the loop for the interpreter, busy at most half of
            # the time. A quick one is never reused: every scrape sees the counts of that moment.
            took = loop.time() - started
            self._reuse_until = loop.time() + (took if took >= SLOW_RENDER_S else 0.0)

        rendering.add_done_callback(rendered)
        return rendering

    def gated(self, path: str, authorization: bytes) -> asyncio.Future[Response]:
        """/metrics or /identity for a caller from off the node: only with a credential the
        controller accepts (for Metrics)."""
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        auth = self.scrape_auth

        async def answer() -> Response:
            if auth is not None:
                status, message = await auth(given or None)
                if status != 200:
                    return status, TEXT, (message + "\n").encode()
            return await self.metrics() if path == "/metrics" else self.route(path)

        return asyncio.get_running_loop().create_task(answer())

    def is_local(self, peer: Any, sock: Any) -> bool:
        """Is the caller on this node's own network stack (loopback, or one of its addresses)?"""
        try:
            ip, own = peer[0], sock[0]
        except (TypeError, IndexError):
            return False  # a unix socket or no address: nothing to vouch for
        if ip == own or ipaddress.ip_address(ip).is_loopback:
            return True
        now = time.monotonic()
        hit = self._local.get(ip)
        if hit is not None and hit[0] > now:
            return hit[1]
        local = not self._nonlocal_bind and _bindable(ip)
        if len(self._local) > 1024:
            self._local.clear()
        self._local[ip] = (now + LOCAL_CACHE_S, local)
        return local

    def _render(self, snap: Snapshot) -> Response:
        """The exposition text, built in pieces of RENDER_CHUNK series: joining one 120 MB text
        (20,000 histograms) held the interpreter for ~0.2 s in one C call, which a thread cannot
        share with the loop; pieces are joined only by the socket (writelines)."""
        chunks: list[bytes] = []
        for name in ALL_METRICS:
            items = list(snap.get(name, {}).items())
            for start in range(0, max(len(items), 1), RENDER_CHUNK):
                part = {name: dict(items[start : start + RENDER_CHUNK])}
                registry = CollectorRegistry(auto_describe=False)
                registry.register(_Families(part, name))
                text = generate_latest(registry)
                if start:  # the family's HELP and TYPE lines come once, with its first piece
                    text = b"".join(line for line in text.splitlines(keepends=True) if not line.startswith(b"# "))
                chunks.append(text)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._process)
        chunks.append(generate_latest(registry))
        return 200, CONTENT_TYPE_LATEST, chunks

    def route(self, path: str) -> Response:
        if path == "/metrics":  # the synchronous form (tests, tools); the server uses metrics()
            return self._render(self._snapshot())
        if path == "/ready":
            if self._ready():
                return 200, TEXT, b"ready\n"
            return 503, TEXT, b"not ready\n"
        if path == "/live":
            return 200, TEXT, b"live\n"
        if path == "/capture":
            from nodemesh.agent.capture import ebpf_capture_state, sockmap_stats

            return 200, "application/json", json.dumps({"excluded_ips": self._excluded_ips(),
                                                        "synced": self._identity_synced(),
                                                        **ebpf_capture_state(),
                                                        "sockmap": sockmap_stats()}).encode()
        if path == "/identity":
            return 200, "application/json", json.dumps(self._identity()).encode()
        return 404, TEXT, b"404: Not Found\n"

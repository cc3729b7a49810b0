"""HTTP/1 relay mode: forwards bytes as received and reports what http1.Http1Exchange saw.

The client and upstream connections are paired one to one, so keep-alive, pipelining and
`Expect: 100-continue` are the peers' own. Input the classifier cannot parse (bad syntax, a head
past 64 KB, a valid request followed by junk) still goes to the server, which answers it as it
would without the mesh; only the classification stops. The agent itself answers only a request
head not complete within the header timeout (408: slowloris) and, when draining, asks the server
to close after the next response (`Connection: close` added to the next request head) — unless a newer
agent takes the connection over between two requests (agent/handover.py).
"""

from __future__ import annotations

import asyncio
import time

from nodemesh.agent import http1
from nodemesh.agent.fairness import BYTES_PER_WORK_SHIFT
from nodemesh.agent.http1 import Http1Exchange, Http1Request
from nodemesh.agent.observe import ALL_HEADERS, RequestEnd
from nodemesh.agent.seam import ModeHost

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
DRAIN_IDLE_CHECK_S = 0.5


# An exchange that ended cleanly with no body bytes counted (the body is counted only while a tap
# or the event log looks): one shared RequestEnd, `ended` 0.0 = now (observe.RequestEnd).
_CLEAN_END = RequestEnd()


def error_response(status: int) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n").encode("ascii")


class Http1Mode:
    __slots__ = (
        "client_opaque", "closing", "conn", "error_status", "exchange", "head_timer", "hold", "idle_mark",
        "idle_timer", "observer", "opaque", "protocol",
    )

    def __init__(self, conn: ModeHost) -> None:
        self.conn = conn
        self.protocol = "http1"
        self.observer = conn.observer
        # An observer that declares no gate (a test's recorder) gets every header, as before.
        self.exchange = Http1Exchange(gate=getattr(conn.observer, "headers_gate", ALL_HEADERS))
        self.opaque = False            # upgraded (101) or the server stopped speaking HTTP/1
        self.client_opaque = False     # the client sent what we cannot parse: its bytes pass untouched
        self.closing = False           # draining: add Connection: close to the next request
        self.hold = False              # after that request: forward nothing more from the client
        self.error_status = 0          # 408 waiting for earlier responses to finish
        self.head_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_mark = -1

    def reader_protocols(self, client: asyncio.Protocol,
                         upstream: asyncio.Protocol) -> tuple[asyncio.Protocol, asyncio.Protocol]:
        """seam.DirectReads: the transports read into this mode from now on."""
        return _ClientReads(self, client), _UpstreamReads(self, upstream)

    # -- client -> upstream ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        conn = self.conn
        if self.hold or self.error_status:
            return
        if self.opaque or self.client_opaque:
            conn.send_upstream(data)
            return
        x = self.exchange
        if self.closing:
            events, out, done = x.feed_request_closing(data)
            if done:
                self.hold = True
        else:
            events = x.feed_request(data)
            out = data
        if events:
            self._handle(events)
        if out:
            conn.send_upstream(out)
        if not self.client_opaque and (x.head_pending or self.head_timer is not None):
            self._sync_head_timer()

    def _sync_head_timer(self) -> None:
        """The 408 timer runs while a request head is incomplete: armed once when one is pending,
        cancelled when none is (the common case, a whole head per read, calls nothing)."""
        if self.exchange.head_pending:
            if self.head_timer is None:
                self.head_timer = self.conn.call_later(self.conn.header_timeout_s, self._head_timeout)
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    # -- upstream -> client ------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.conn.send_client(data)
        if self.opaque:
            return
        events = self.exchange.feed_response(data)
        if events:
            self._handle(events)

    # -- events ------------------------------------------------------------------------------

    def _handle(self, events: list[http1.Event]) -> None:
        """Report what the classifier saw; act on the client becoming unparseable or an upgrade."""
        observer = self.observer
        for kind, arg in events:
            if kind == http1.REQUEST_HEAD:
                if self.conn.slow:
                    self.conn.head_arrived()
                req: Http1Request = arg  # type: ignore[assignment]
                req.obs = observer.request_start(self.conn.obs, req)  # it is its own RequestHead
            elif kind == http1.RESPONSE_HEAD:
                req = arg  # type: ignore[assignment]
                observer.response_start(req.obs, req.status, req.response_headers, req.response_at)
            elif kind == http1.EXCHANGE_END:
                req = arg  # type: ignore[assignment]
                observer.request_end(req.obs, RequestEnd(None, None, req.request_bytes, req.response_bytes)
                                     if req.request_bytes or req.response_bytes else _CLEAN_END)
                req.obs = None  # the observer's handle may hold req (its head): no cycle left behind
                if self.error_status and not self.exchange.awaiting:
                    self._answer_error()
                elif not (x := self.exchange).awaiting and not x.head_pending and x.req_side.req is None:
                    # Idle (Http1Exchange.idle, inlined): between requests, draining beside a newer
                    # agent, the connection can move here.
                    self.conn.at_boundary()
            elif kind == http1.UPGRADED:
                self.opaque = True
                self._cancel_timers()
            elif kind == http1.CLIENT_ERROR:
                # Transparency: whatever the client sent goes to the server, which answers it (nginx:
                # 400 for bad syntax, the request answered first when junk follows one). The agent
                # only stops following the client's side; the responses still owed are classified.
                self.client_opaque = True
                if self.head_timer is not None:
                    self.head_timer.cancel()
                    self.head_timer = None
            elif kind == http1.UPSTREAM_ERROR:
                self._upstream_error()

    def _answer_error(self) -> None:
        self.conn.write_client(error_response(self.error_status))
        self._cancel_timers()
        self.conn.linger_close()

    def _upstream_error(self) -> None:
        now = time.monotonic()
        for req in self.exchange.close():
            self.observer.request_end(req.obs, RequestEnd(
                None, "protocol error", req.request_bytes, req.response_bytes, now))
            req.obs = None
        self.opaque = True
        self._cancel_timers()

    def _head_timeout(self) -> None:
        self.head_timer = None
        if self.exchange.head_pending and not self.opaque:
            self.error_status = 408
            if not self.exchange.awaiting:
                self._answer_error()

    # -- lifecycle ---------------------------------------------------------------------------

    def drain(self) -> None:
        if self.opaque or self.closing:
            return
        self.closing = True
        self.idle_mark = self.conn.read_bytes
        self.idle_timer = self.conn.call_later(DRAIN_IDLE_CHECK_S, self._drain_idle_check)

    def _drain_idle_check(self) -> None:
        # A keep-alive connection on which the client sent nothing for a whole check period is
        # closed; a busy one gets `Connection: close` on its next request instead (no race).
        self.idle_timer = None
        conn = self.conn
        if self.exchange.idle and conn.read_bytes == self.idle_mark and not conn.frozen:
            conn.close_both()
            return
        self.idle_mark = conn.read_bytes
        self.idle_timer = conn.call_later(DRAIN_IDLE_CHECK_S, self._drain_idle_check)

    def _cancel_timers(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def close(self, upstream_clean: bool) -> None:
        self._cancel_timers()
        now = time.monotonic()
        for req in self.exchange.close():
            # A response delimited by the end of the connection (no length, HTTP/1.0) ended cleanly.
            clean = upstream_clean and req.status != 0 and req.request_done
            self.observer.request_end(req.obs, RequestEnd(
                None, None if clean else "connection closed", req.request_bytes, req.response_bytes, now))
            req.obs = None


class _Reads(asyncio.Protocol):
    """A transport's protocol once the relay handed its reads to the mode (seam.DirectReads):
    `data_received` is the subclass's; everything else goes to the relay's own protocol `proto`."""

    __slots__ = ("conn", "mode", "proto")

    def __init__(self, mode: Http1Mode, proto: asyncio.Protocol) -> None:
        self.mode = mode
        self.conn = mode.conn
        self.proto = proto

    def eof_received(self) -> bool | None:
        return self.proto.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.connection_lost(exc)

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()


class _ClientReads(_Reads):
    """The client side: Connection.data_received's accounting and Http1Mode.client_data's common
    case in one call (docs/bench.md "Hot path steps", step 8)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        n = len(data)
        load = conn.load
        load.work += 1 + (n >> BYTES_PER_WORK_SHIFT)   # fairness.py: what the worker spends on it
        if load.work > load.budget:
            conn.over_budget(load)   # pauses reading after this read; this one is handled below
        conn.read_bytes += n
        mode = self.mode
        if mode.hold or mode.error_status or mode.opaque or mode.client_opaque or mode.closing:
            mode.client_data(data)
            return
        # Http1Mode.client_data, its common case inlined:
        x = mode.exchange
        events = x.feed_request(data)
        if events:
            mode._handle(events)
        conn.send_upstream(data)
        if not mode.client_opaque and (x.head_pending or mode.head_timer is not None):
            mode._sync_head_timer()


class _UpstreamReads(_Reads):
    """The upstream side: the relay's _Upstream.data_received (its accounting) and
    Http1Mode.upstream_data in one call."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        n = len(data)
        conn.write_bytes += n
        conn.send_client(data)
        mode = self.mode
        if not mode.opaque:
            events = mode.exchange.feed_response(data)
            if events:
                mode._handle(events)
        load = conn.load
        load.work += 1 + (n >> BYTES_PER_WORK_SHIFT)
        if load.work > load.budget:
            conn.over_budget(load)

"""HTTP/1 relay mode: forwards bytes as received and reports what http1.Http1Exchange saw.

The client and upstream connections are paired one to one, so keep-alive, pipelining and
`Expect: 100-continue` are the peers' own; the agent only steps in for input no server should
accept (400/431, slowloris 408) and, when draining, to ask the server to close after the next
response (`Connection: close` added to the next request head).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from nodemesh.agent import http1
from nodemesh.agent.http1 import Http1Exchange, Http1Request
from nodemesh.agent.observe import RequestEnd, RequestHead

if TYPE_CHECKING:
    from nodemesh.agent.relay import Connection

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
DRAIN_IDLE_CHECK_S = 0.5


def error_response(status: int) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n").encode("ascii")


class Http1Mode:
    __slots__ = (
        "closing", "conn", "error_status", "exchange", "head_timer", "hold", "idle_mark", "idle_timer",
        "observer", "opaque", "protocol",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.protocol = "http1"
        self.observer = conn.ctx.observer
        self.exchange = Http1Exchange()
        self.opaque = False            # upgraded (101) or the server stopped speaking HTTP/1
        self.closing = False           # draining: add Connection: close to the next request
        self.hold = False              # after that request: forward nothing more from the client
        self.error_status = 0          # a client error waiting for earlier responses to finish
        self.head_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_mark = -1

    # -- client -> upstream ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        conn = self.conn
        if self.opaque:
            conn.up.write(data)  # type: ignore[union-attr]
            return
        if self.hold or self.error_status:
            return
        x = self.exchange
        forwarded_before = len(x.awaiting)
        if self.closing:
            events, out, done = x.feed_request_closing(data)
            if done:
                self.hold = True
        else:
            events = x.feed_request(data)
            out = data
        if events and self._handle(events, forwarded_before):
            return
        if out:
            conn.up.write(out)  # type: ignore[union-attr]
        if x.head_pending:
            if self.head_timer is None:
                self.head_timer = asyncio.get_running_loop().call_later(
                    conn.ctx.config.header_timeout_s, self._head_timeout)
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    # -- upstream -> client ------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.conn.client.write(data)  # type: ignore[union-attr]
        if self.opaque:
            return
        events = self.exchange.feed_response(data)
        if events:
            self._handle(events, 0)

    # -- events ------------------------------------------------------------------------------

    def _handle(self, events: list[http1.Event], forwarded_before: int) -> bool:
        """Report events; True if the client chunk must not be forwarded."""
        observer = self.observer
        for kind, arg in events:
            if kind == http1.REQUEST_HEAD:
                if self.conn.slow:
                    self.conn.head_arrived()
                req: Http1Request = arg  # type: ignore[assignment]
                req.obs = observer.request_start(self.conn.obs, RequestHead(
                    req.method, "http", req.authority, req.path, req.headers, False, req.ordinal,
                    req.started))
            elif kind == http1.RESPONSE_HEAD:
                req = arg  # type: ignore[assignment]
                observer.response_start(req.obs, req.status, req.response_headers, req.response_at)
            elif kind == http1.EXCHANGE_END:
                req = arg  # type: ignore[assignment]
                observer.request_end(req.obs, RequestEnd(
                    None, None, req.request_bytes, req.response_bytes, time.monotonic()))
                if self.error_status and not self.exchange.awaiting:
                    self._answer_error()
            elif kind == http1.UPGRADED:
                self.opaque = True
                self._cancel_timers()
            elif kind == http1.CLIENT_ERROR:
                self._client_error(int(arg), forwarded_before)  # type: ignore[arg-type]
                return True
            elif kind == http1.UPSTREAM_ERROR:
                self._upstream_error()
        return False

    def _client_error(self, status: int, forwarded_before: int) -> None:
        """Bad input: answer like a server would, after the responses already owed."""
        x = self.exchange
        self.error_status = status
        now = time.monotonic()
        # Requests whose heads arrived in the rejected chunk were never forwarded: the agent
        # answers them itself with the error status.
        while len(x.awaiting) > forwarded_before:
            req = x.awaiting.pop()
            self.observer.response_start(req.obs, status, [], now)
            self.observer.request_end(req.obs, RequestEnd(None, None, req.request_bytes, 0, now))
        self.conn.client.pause_reading()  # type: ignore[union-attr]
        if not x.awaiting:
            self._answer_error()

    def _answer_error(self) -> None:
        self.conn.write_client(error_response(self.error_status))
        self._cancel_timers()
        self.conn.linger_close()

    def _upstream_error(self) -> None:
        now = time.monotonic()
        for req in self.exchange.close():
            self.observer.request_end(req.obs, RequestEnd(
                None, "protocol error", req.request_bytes, req.response_bytes, now))
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
        self.idle_timer = asyncio.get_running_loop().call_later(DRAIN_IDLE_CHECK_S, self._drain_idle_check)

    def _drain_idle_check(self) -> None:
        # A keep-alive connection on which the client sent nothing for a whole check period is
        # closed; a busy one gets `Connection: close` on its next request instead (no race).
        self.idle_timer = None
        conn = self.conn
        if self.exchange.idle and conn.read_bytes == self.idle_mark:
            conn.close_both()
            return
        self.idle_mark = conn.read_bytes
        self.idle_timer = asyncio.get_running_loop().call_later(DRAIN_IDLE_CHECK_S, self._drain_idle_check)

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

"""WorkerTelemetry: the `Observer` a worker's traffic path calls, counting in plain Python.

Per connection, the peers are looked up once and turned into label tuples; per request the
work is a tuple concat and a few dict increments (twice when the same-node rule applies), plus
one truthiness check of the open-taps dict. Every `report_interval_s` the worker sends a
cumulative snapshot to the parent (NodeTelemetry) over its workerlink, and it applies the
identity snapshots and tap commands the parent sends down.

Same-node rule: an outbound connection whose destination is a pod on THIS node is also recorded
as inbound (the destination's agent is this agent and will never see the request again), from
the one observation. So a request is counted once per direction, never twice in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from nodemesh.agent import workerlink
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import MetricsStore, classify
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.podindex import PeerLabels, PodIndex
from nodemesh.agent.tap import Tap, TapRegistry, peer_message
from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.telemetry")


class _Conn:
    """Per-connection state: label prefixes fixed at open (so open/close/gauge series agree)."""

    __slots__ = ("bases", "directions", "dst", "keys", "keys_for", "meta", "service", "src", "tcp_keys")

    def __init__(self, meta: ConnectionMeta, src: PeerLabels, dst: PeerLabels, service: str,
                 bases: tuple[tuple[str, ...], ...]) -> None:
        self.meta = meta
        self.src = src
        self.dst = dst
        self.service = service
        self.bases = bases  # one label prefix per direction recorded (two under the same-node rule)
        self.directions = tuple(b[0] for b in bases)
        self.tcp_keys = tuple(b + ("", meta.protocol) for b in bases)
        # Request label keys for the last (authority, protocol): keep-alive requests reuse them.
        self.keys_for: tuple[str, str] | None = None
        self.keys: tuple[tuple[str, ...], ...] = ()


class _Req:
    __slots__ = ("conn", "done", "head", "keys", "started", "status", "taps")

    def __init__(self, conn: _Conn, head: RequestHead, keys: tuple[tuple[str, ...], ...],
                 started: float) -> None:
        self.conn = conn
        self.head = head
        self.keys = keys
        self.started = started
        self.status: int | None = None
        self.done = False
        self.taps: list[tuple[Tap, str]] | None = None  # (tap, direction it is shown in)


class WorkerTelemetry:
    """Implements agent.observe.Observer for one worker process."""

    def __init__(self, config: AgentConfig, child_end: workerlink.ChannelEnd | None = None,
                 worker_index: int = 0) -> None:
        self.config = config
        self.worker_index = worker_index
        # conn_ids are per worker: tap ids get the worker as a prefix ("2.17:1") past worker 0,
        # so req/rsp/end lines of different workers never share an id.
        self._conn_prefix = f"{worker_index}." if worker_index else ""
        self.index = PodIndex(config.node)
        self.metrics = MetricsStore()
        self.taps = TapRegistry(config.tap_max_rps)
        self._end = child_end
        self._link: workerlink.Link | None = None
        self._task: asyncio.Task[None] | None = None
        self.tap_sink: Any = None  # optional callable(pb.TapEvent), used when there is no link (tests)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._end is not None:
            self._link = workerlink.Link(self._end, self._on_message, self._on_parent_gone)
            self._link.start()
            self._link.send((workerlink.MSG_HELLO, self.worker_index, os.getpid()))
            self._task = asyncio.get_running_loop().create_task(self._report_loop())

    async def stop(self) -> None:
        """Send a last snapshot so the node's totals include everything this worker counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._link is not None and not self._link.closed:
            self.send_snapshot()
            await self._link.drain()
            self._link.close()

    async def wait_identity(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) for the first identity snapshot, so early requests aren't all `unknown`.

        The parent sends it right after attach_worker; call this after start() and before accepting.
        """
        deadline = time.monotonic() + timeout
        while not self.index.generation and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return bool(self.index.generation)

    def send_snapshot(self) -> None:
        if self._link is not None:
            self._link.send((workerlink.MSG_METRICS, self.metrics.snapshot()))

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            self.send_snapshot()

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == workerlink.MSG_IDENTITY:
            self.index.update(msg[1])
        elif kind == workerlink.MSG_TAP_OPEN:
            self.taps.open(msg[1], pb.TapFilter.FromString(msg[2]))
        elif kind == workerlink.MSG_TAP_CLOSE:
            self.taps.close(msg[1])
        elif kind == workerlink.MSG_FLUSH:
            self.send_snapshot()

    def _on_parent_gone(self) -> None:
        # The parent supervises us; without it nobody reads our counts. Keep serving traffic:
        # the supervisor decides when a worker exits, not the telemetry.
        log.warning("event=parent_link_closed worker=%d", self.worker_index)
        self.taps.close_all()

    def _emit(self, event: pb.TapEvent) -> None:
        if self._link is not None:
            self._link.send((workerlink.MSG_TAP_EVENT, event.SerializeToString()))
        elif self.tap_sink is not None:
            self.tap_sink(event)

    # ------------------------------------------------------------------ Observer (hot path)
    def connection_open(self, meta: ConnectionMeta) -> _Conn:
        index = self.index
        src = index.peer_labels(meta.source[0])
        dst_ip = meta.destination[0]
        dst = index.peer_labels(dst_ip)
        service = index.service_of(*meta.original_destination)
        base = (meta.direction, *src, *dst, service)
        bases: tuple[tuple[str, ...], ...] = (base,)
        if meta.direction == "outbound":
            # Same-node rule: this agent is also the destination's agent, and the request will not
            # come past it again, so record the inbound view now (unless the callee's namespace is
            # not captured: then nobody records its inbound side, same as across nodes).
            if index.is_local_pod(dst_ip) and dst[0] not in index.excluded_namespaces:
                bases = (base, ("inbound", *base[1:]))
        elif index.is_local_pod(meta.source[0]) and src[0] not in index.excluded_namespaces:
            # Inbound from a captured pod of this node: its outbound capture already recorded both
            # directions. Should it reach the inbound listener too, count nothing a second time.
            bases = ()
        conn = _Conn(meta, src, dst, service, bases)
        m = self.metrics
        opened, gauge = m.tcp_open_total, m.tcp_open_connections
        for key in conn.tcp_keys:
            opened[key] = opened.get(key, 0) + 1
            gauge[key] = gauge.get(key, 0) + 1
        return conn

    def connection_close(self, conn: _Conn, end: ConnectionEnd) -> None:
        m = self.metrics
        ended = end.ended or time.monotonic()
        duration_ms = (ended - conn.meta.started) * 1000.0 if conn.meta.started else 0.0
        error = end.error or ""
        closed, gauge, rd, wr = m.tcp_close_total, m.tcp_open_connections, m.tcp_read_bytes, m.tcp_write_bytes
        for key in conn.tcp_keys:
            ckey = (*key, error)
            closed[ckey] = closed.get(ckey, 0) + 1
            gauge[key] = gauge.get(key, 0) - 1
            rd[key] = rd.get(key, 0) + end.read_bytes
            wr[key] = wr.get(key, 0) + end.write_bytes
            m.observe(m.tcp_duration, key, duration_ms)

    def request_start(self, conn: _Conn, head: RequestHead) -> _Req:
        suffix = (head.authority, conn.meta.protocol)
        if suffix == conn.keys_for:
            keys = conn.keys
        else:
            keys = conn.keys = tuple(b + suffix for b in conn.bases)
            conn.keys_for = suffix
        req = _Req(conn, head, keys, head.started or time.monotonic())
        counts = self.metrics.request_total
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        if self.taps.taps:
            self._tap_request(req)
        return req

    def response_start(self, req: _Req, status: int, headers: list[tuple[str, str]], at: float) -> None:
        if req.status is not None:  # 1xx informational heads come first; count the final one only
            return
        if status < 200 and status != 101:
            return
        req.status = status
        ms = ((at or time.monotonic()) - req.started) * 1000.0
        m = self.metrics
        for key in req.keys:
            m.observe(m.response_latency, key, ms)
        if req.taps is not None:
            self._tap_response(req, status, headers, at)

    def request_end(self, req: _Req, end: RequestEnd) -> None:
        if req.done:
            return
        req.done = True
        labels = classify(req.status, req.head.grpc, end.grpc_status, end.reset_error)
        counts = self.metrics.response_total
        for key in req.keys:
            rkey = key + labels
            counts[rkey] = counts.get(rkey, 0) + 1
        if req.taps is not None:
            self._tap_end(req, end)

    # ------------------------------------------------------------------ tap (only when open)
    def _event(self, tap: Tap, req: _Req, direction: str) -> pb.TapEvent:
        meta = req.conn.meta
        return pb.TapEvent(
            tap_id=tap.id,
            request_id=f"{self._conn_prefix}{meta.conn_id}:{req.head.stream_id}",
            direction=direction,
            source=peer_message(meta.source[0], meta.source[1], req.conn.src),
            destination=peer_message(meta.destination[0], meta.destination[1], req.conn.dst),
            node=self.config.node,
            time_ms=int(time.time() * 1000),
        )

    def _tap_request(self, req: _Req) -> None:
        conn = req.conn
        if not conn.bases:
            return  # a duplicate observation: its first sighting already tapped it
        req.taps = self.taps.match(conn.src, conn.dst, conn.service, req.head, conn.directions)
        if req.taps is None:
            return
        head = req.head
        headers = [pb.Header(name=k, value=v) for k, v in head.headers]
        for tap, direction in req.taps:
            ev = self._event(tap, req, direction)
            ev.request_init.CopyFrom(pb.RequestInit(method=head.method, scheme=head.scheme,
                                                    authority=head.authority, path=head.path,
                                                    headers=headers))
            self._emit(ev)

    def _tap_response(self, req: _Req, status: int, headers: list[tuple[str, str]], at: float) -> None:
        since = int(((at or time.monotonic()) - req.started) * 1e6)
        hdrs = [pb.Header(name=k, value=v) for k, v in headers]
        for tap, direction in req.taps or ():
            ev = self._event(tap, req, direction)
            ev.response_init.CopyFrom(pb.ResponseInit(http_status=status, since_request_init_us=since,
                                                      headers=hdrs))
            self._emit(ev)

    def _tap_end(self, req: _Req, end: RequestEnd) -> None:
        since = int(((end.ended or time.monotonic()) - req.started) * 1e6)
        for tap, direction in req.taps or ():
            ev = self._event(tap, req, direction)
            ev.response_end.CopyFrom(pb.ResponseEnd(
                has_grpc_status=end.grpc_status is not None, grpc_status=end.grpc_status or 0,
                reset_error=end.reset_error or "", since_request_init_us=since,
                response_bytes=end.response_bytes,
            ))
            self._emit(ev)

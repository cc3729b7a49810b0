"""WorkerTelemetry: the `Observer` a worker's traffic path calls, counting in plain Python.

Identity is looked up when used, not frozen at connection open. At open the peers are resolved
against the index (who held each address *when the connection was accepted*) and turned into
label tuples; per request the work is a tuple concat and a few dict increments (twice when the
same-node rule applies), plus one truthiness check of the open-taps dict. When an identity update
changes an address a live connection uses (an unknown peer became known, a ClusterIP got its
Service, a pod that held the address is gone and another holds it), that connection is re-resolved
then, once: its next request counts under the new labels and its open-connection gauge moves with
it (-1 under the old label set, +1 under the new), so the tcp_* series stay consistent. Nothing
already counted moves; nothing is counted twice. A side resolved to a pod keeps it for the
connection's life while that pod still claims the address (a TCP connection cannot change hands).

Every `report_interval_s` the worker hands the parent (NodeTelemetry) what it counted since the
last time (`MetricsStore.take`), and it applies the identity messages and tap commands the parent
sends down. A delta that does not fit the identity it holds makes it ask the parent for a full
snapshot.

Same-node rule: an outbound connection whose destination is a pod on THIS node is also recorded
as inbound (the destination's agent is this agent and will never see the request again), from
the one observation. So a request is counted once per direction, never twice in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from nodemesh.agent import redact, workerlink
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import HTTP_LABELS, MetricsStore, classify
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.podindex import Changes, IdentityGap, Owner, PeerLabels, PodIndex, unknown_labels
from nodemesh.agent.routes import RouteTable, RouteTables, rules_from_config
from nodemesh.agent.tap import Tap, TapRegistry, peer_message
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import NO_TLS, UNKNOWN_KIND, tls_labels
from nodemesh.api.model import OTHER_LABEL_VALUE as OTHER_ROUTE

log = logging.getLogger("nodemesh.agent.telemetry")

ANY = "*"  # a wait for the agent's first identity, whatever the addresses
# A worker holds every new connection for its first identity only this long after it started: an
# agent that cannot reach its controller must not delay every connection for good.
FIRST_IDENTITY_WINDOW_S = 10.0


class _Conn:
    """Per-connection state: who the peers are (re-resolved when identity changes), and the label
    prefixes the tcp series were counted under (so open/close/gauge agree)."""

    __slots__ = ("at_ms", "bases", "directions", "dst", "dst_uid", "keys", "keys_for", "meta", "route_bases",
                 "route_keys", "route_table", "service", "src", "src_uid", "tcp_keys", "tls")

    def __init__(self, meta: ConnectionMeta, at_ms: int) -> None:
        self.meta = meta
        self.at_ms = at_ms                  # accept time, epoch ms: who held an address *then*
        self.src: PeerLabels = unknown_labels(meta.source[0])
        self.dst: PeerLabels = unknown_labels(meta.destination[0])
        self.src_uid = ""
        self.dst_uid = ""
        self.service = ""
        self.bases: tuple[tuple[str, ...], ...] = ()  # one label prefix per direction recorded
        self.directions: tuple[str, ...] = ()
        self.tcp_keys: tuple[tuple[str, ...], ...] = ()
        self.tls: tuple[str, str, str] = NO_TLS  # the tls, client_id, server_id labels (PEER_LABELS' last)
        # Request label keys for the last authority: keep-alive requests reuse them. The protocol
        # is fixed once the connection is open, and a change of its tls labels rebinds (None).
        self.keys_for: str | None = None
        self.keys: tuple[tuple[str, ...], ...] = ()
        # Route series (agent/routes.py): one label prefix per direction, the destination
        # workload's route table, and the keys per route seen on this connection.
        self.route_bases: tuple[tuple[str, ...], ...] = ()
        self.route_table: RouteTable | None = None
        self.route_keys: dict[str, tuple[tuple[str, ...], ...]] = {}


class _Req:
    __slots__ = ("conn", "done", "head", "keys", "route_keys", "started", "status", "taps")

    def __init__(self, conn: _Conn, head: RequestHead, keys: tuple[tuple[str, ...], ...],
                 started: float) -> None:
        self.conn = conn
        self.head = head
        self.keys = keys
        self.route_keys: tuple[tuple[str, ...], ...] = ()
        self.started = started
        self.status: int | None = None
        self.done = False
        self.taps: list[tuple[Tap, str]] | None = None  # (tap, direction it is shown in)


class _Wait:
    """A connection from (or to) an unknown local-pod address, waiting for its identity."""

    __slots__ = ("future", "pending", "started", "timer")

    def __init__(self, future: asyncio.Future[str], pending: set[str]) -> None:
        self.future = future
        self.pending = pending
        self.started = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None


def _networks(cidrs: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    nets = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if net.version == 4:
            nets.append((int(net.network_address), int(net.netmask)))
    return tuple(nets)


def _ipv4_int(ip: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


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
        # Per-route series (agent/routes.py); None: off (--no-route-metrics), nothing per route.
        self.routes = RouteTables(config.max_routes) if config.route_metrics else None
        self._routes_reset_at = time.monotonic()
        self.taps = TapRegistry(config.tap_max_rps)
        self.headers_gate = self.taps  # headers are decoded only while a tap is open (observe.py)
        self.redaction = redact.DEFAULT  # the mesh config's, once an identity brings one
        self._end = child_end
        self._link: workerlink.Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._live: set[_Conn] = set()
        self._waits: dict[str, list[_Wait]] = {}
        self._local_nets = _networks(config.pod_cidrs)
        self._born = time.monotonic()
        self.corrections = 0
        self.resyncs_requested = 0
        self._conntrack: Any = None                 # agent.conntrack.ConntrackLookup, opened when first needed
        self._conntrack_warned = False
        # Called with the MeshConfig each time a controller's identity brings one (opaque ports).
        self.on_mesh_config: list[Callable[[pb.MeshConfig], None]] = []

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

    def send_snapshot(self) -> None:
        """Hand the parent what was counted since the last time (kept if the link cannot take it)."""
        if self._link is None:
            return
        taken = self.metrics.take()
        if not self._link.send((workerlink.MSG_METRICS, taken)):
            self.metrics.restore(taken)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            self.send_snapshot()
            self.expire_routes()

    def expire_routes(self, now: float | None = None) -> None:
        """Forget the routes learned, every `series_idle_s`: the parent evicts idle route series
        on that clock, and routes that went away must free their place under the cap here too.
        (Live connections keep their table until their next rebind; a fresh table relearns.)"""
        now = time.monotonic() if now is None else now
        if self.routes is not None and now - self._routes_reset_at >= self.config.series_idle_s:
            self._routes_reset_at = now
            self.routes.reset()
            for conn in self._live:
                conn.route_table, conn.route_keys = None, {}
                self._bind_routes(conn)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == workerlink.MSG_IDENTITY:
            self.apply_identity(pb.ControllerMessage.FromString(msg[1]))
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

    # ------------------------------------------------------------------ identity
    def apply_identity(self, message: pb.ControllerMessage | pb.IdentitySnapshot | pb.IdentityDelta) -> bool:
        """Apply a snapshot or delta; re-resolve the live connections it touches. A delta that does
        not fit what we hold asks the parent for the whole identity (False)."""
        try:
            changes = self.index.update(message)
        except IdentityGap as gap:
            log.info("event=identity_gap worker=%d %s", self.worker_index, gap)
            self.resyncs_requested += 1
            if self._link is not None:
                self._link.send((workerlink.MSG_IDENTITY_RESYNC, self.worker_index))
            return False
        if changes.config and self.index.epoch:
            self._apply_mesh_config()
        if changes:
            self.refresh(changes)
        return True

    def _apply_mesh_config(self) -> None:
        """Settings from the controller replace our flags (a file-fed index has no controller's)."""
        config = self.index.config
        if config.tap_max_rps > 0:
            self.taps.default_max_rps = config.tap_max_rps
        self.redaction = redact.Redaction.build(config.tap_redact_headers, config.tap_show_headers,
                                                config.tap_redact_query)
        if self.routes is not None:
            self.routes.configure(rules_from_config(config.routes))  # configured routes win
        for callback in self.on_mesh_config:
            callback(config)

    def refresh(self, changes: Changes) -> None:
        """Re-resolve live connections whose addresses the update touched; wake waiters."""
        ips, cluster_ips, full = changes.ips, changes.cluster_ips, changes.full
        for conn in list(self._live):
            meta = conn.meta
            if full or meta.source[0] in ips or (meta.endpoint or meta.destination)[0] in ips \
                    or meta.original_destination[0] in cluster_ips:
                self._rebind(conn)
        if self._waits:
            for ip in [ip for ip in self._waits if ip == ANY or self.index.owner(ip) is not None]:
                for wait in self._waits.pop(ip):
                    wait.pending.discard(ip)
                    if not wait.pending:
                        self._finish_wait(wait, "known")

    def identity_gate(self, source: str, destination: str) -> asyncio.Future[str] | None:
        """None to go on at once; else a future done when the unknown local-pod address(es) among
        `source`/`destination` are known (or, before the agent's first identity, when that
        arrives), or after `identity_wait_s`; counted either way. Only with an identity source:
        without one nothing would ever arrive."""
        index = self.index
        config = self.config
        if config.identity_wait_s <= 0 or not (config.controller or config.identity_file):
            return None  # off, or no identity source at all: nothing would arrive
        if not index.generation:
            if time.monotonic() - self._born > FIRST_IDENTITY_WINDOW_S:
                return None  # no identity for that long (controller away?): don't delay everything
            pending = {ANY}  # a (re)started agent before its first identity: every connection waits
        elif not self._local_nets:
            return None
        else:
            pending = {ip for ip in (source, destination) if index.owner(ip) is None and self._in_local_cidr(ip)}
            if not pending:
                return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        wait = _Wait(future, pending)
        wait.timer = loop.call_later(self.config.identity_wait_s, self._finish_wait, wait, "timeout")
        for ip in pending:
            self._waits.setdefault(ip, []).append(wait)
        return future

    def _in_local_cidr(self, ip: str) -> bool:
        value = _ipv4_int(ip)
        return value is not None and any(value & mask == net for net, mask in self._local_nets)

    def _finish_wait(self, wait: _Wait, outcome: str) -> None:
        if wait.future.done():
            return
        if wait.timer is not None:
            wait.timer.cancel()
        for ip in wait.pending:
            waits = self._waits.get(ip)
            if waits is not None and wait in waits:
                waits.remove(wait)
                if not waits:
                    del self._waits[ip]
        m = self.metrics
        m.observe(m.identity_wait, (outcome,), (time.monotonic() - wait.started) * 1000.0)
        wait.future.set_result(outcome)

    def learn_endpoint(self, local: tuple[str, int], dialled: tuple[str, int]) -> tuple[str, int] | None:
        """The relay dialled an address it had no endpoint for: if that is not a pod we know, ask
        conntrack which pod kube-proxy's DNAT chose (counted in nodemesh_endpoint_lookups_total)."""
        if self.index.owner(dialled[0]) is not None:
            return None  # a pod address: nobody translated it
        lookups = self.metrics.endpoint_lookups
        try:
            if self._conntrack is None:
                from nodemesh.agent.conntrack import ConntrackLookup

                self._conntrack = ConntrackLookup()
            endpoint: tuple[str, int] | None = self._conntrack.endpoint(local, dialled)
        except OSError as exc:
            lookups[("failed",)] = lookups.get(("failed",), 0) + 1
            if not self._conntrack_warned:
                self._conntrack_warned = True
                log.warning("event=conntrack_lookup_failed error=%r", exc)
            return None
        if endpoint is None or endpoint == dialled:
            lookups[("none",)] = lookups.get(("none",), 0) + 1
            return None
        lookups[("found",)] = lookups.get(("found",), 0) + 1
        return endpoint

    def count_splice(self, outcome: str) -> None:
        """A bulk opaque connection's splice decision (relay.try_splice; nodemesh_splice_decisions_total)."""
        decisions = self.metrics.splice_decisions
        decisions[(outcome,)] = decisions.get((outcome,), 0) + 1

    def count_tunnel(self, event: str, reason: str) -> None:
        """An mTLS tunnel event (agent/tunnel.py; nodemesh_tunnel_events_total)."""
        events = self.metrics.tunnel_events
        events[(event, reason)] = events.get((event, reason), 0) + 1

    def count_endpoint_retry(self, via: str, outcome: str) -> None:
        """relay._dial retried a failed connect (nodemesh_endpoint_retries_total)."""
        retries = self.metrics.endpoint_retries
        retries[(via, outcome)] = retries.get((via, outcome), 0) + 1

    def _owner_for(self, ip: str, current_uid: str, at_ms: int) -> Owner | None:
        """The owner a connection's side should have now; None to keep what it has."""
        index = self.index
        if current_uid and index.claims(ip, current_uid):
            return None  # still that pod's address: a connection never changes hands
        return index.resolve(ip, at_ms)

    def _bind(self, conn: _Conn) -> None:
        """Label prefixes (bases) from the connection's current peers."""
        meta = conn.meta
        index = self.index
        base = (meta.direction, *conn.src, *conn.dst, conn.service)
        bases: tuple[tuple[str, ...], ...] = (base,)
        dst_ip = (meta.endpoint or meta.destination)[0]
        if meta.direction == "outbound":
            # Same-node rule: this agent is also the destination's agent, and the request will not
            # come past it again, so record the inbound view now (unless the callee's namespace is
            # not captured: then nobody records its inbound side, same as across nodes).
            if index.is_local_pod(dst_ip) and not index.uncaptured(conn.dst[0]):
                bases = (base, ("inbound", *base[1:]))
        elif index.is_local_pod(meta.source[0]) and not index.uncaptured(conn.src[0]):
            # Inbound from a captured pod of this node: its outbound capture already recorded both
            # directions. Should it reach the inbound listener too, count nothing a second time.
            bases = ()
        conn.bases = bases
        conn.directions = tuple(b[0] for b in bases)
        # Same-node connections never enter a tunnel: meta.mtls is None, both views say NO_TLS.
        conn.tls = tls = tls_labels(meta.mtls, meta.direction)
        conn.tcp_keys = tuple(b + ("", meta.protocol, *tls) for b in bases)
        conn.keys_for = None
        if self.routes is not None:
            self._bind_routes(conn)

    def _bind_routes(self, conn: _Conn) -> None:
        """Route label prefixes: workloads only (no pods; an unknown peer's name is "", not its
        IP, so external clients cannot multiply route series), and the destination's table."""
        src_ns, src_kind, src_name, _ = conn.src
        dst_ns, dst_kind, dst_name, _ = conn.dst
        if src_kind == UNKNOWN_KIND:
            src_name = ""
        if dst_kind == UNKNOWN_KIND:
            dst_name = ""
        rest = (src_ns, src_kind, src_name, dst_ns, dst_kind, dst_name, conn.service)
        conn.route_bases = tuple((direction, *rest) for direction in conn.directions)
        conn.route_table = self.routes.table(dst_ns, dst_kind, dst_name)  # type: ignore[union-attr]
        conn.route_keys = {}

    def _rebind(self, conn: _Conn) -> None:
        meta = conn.meta
        index = self.index
        changed = False
        src = self._owner_for(meta.source[0], conn.src_uid, conn.at_ms)
        if src is not None and src.uid != conn.src_uid:
            if conn.src_uid:
                self._correction("src")
            conn.src, conn.src_uid, changed = src.labels, src.uid, True
        dst_ip = (meta.endpoint or meta.destination)[0]
        dst = self._owner_for(dst_ip, conn.dst_uid, conn.at_ms)
        if dst is not None and dst.uid != conn.dst_uid:
            if conn.dst_uid:
                self._correction("dst")
            conn.dst, conn.dst_uid, changed = dst.labels, dst.uid, True
        elif dst is None and not conn.dst_uid and conn.dst[2] != dst_ip:
            conn.dst, changed = unknown_labels(dst_ip), True  # a new endpoint nobody knows yet
        service = index.service_of(*meta.original_destination) or conn.service
        if service != conn.service:
            conn.service, changed = service, True
        old_keys = conn.tcp_keys
        self._bind(conn)
        if not changed and conn.tcp_keys == old_keys:
            return
        if conn.tcp_keys != old_keys:
            gauge = self.metrics.tcp_open_connections
            for key in old_keys:
                gauge[key] = gauge.get(key, 0) - 1
            for key in conn.tcp_keys:
                gauge[key] = gauge.get(key, 0) + 1

    def _correction(self, side: str) -> None:
        self.corrections += 1
        c = self.metrics.identity_corrections
        c[(side,)] = c.get((side,), 0) + 1

    # ------------------------------------------------------------------ Observer (hot path)
    def connection_open(self, meta: ConnectionMeta) -> _Conn:
        now_ms = time.time() * 1000.0
        at_ms = int(now_ms - (time.monotonic() - meta.started) * 1000.0) if meta.started else int(now_ms)
        conn = _Conn(meta, at_ms)
        index = self.index
        src = index.resolve(meta.source[0], at_ms)
        if src is not None:
            conn.src, conn.src_uid = src.labels, src.uid
        dst_ip = (meta.endpoint or meta.destination)[0]
        dst = index.resolve(dst_ip, at_ms)
        if dst is not None:
            conn.dst, conn.dst_uid = dst.labels, dst.uid
        else:
            conn.dst = unknown_labels(dst_ip)
        conn.service = index.service_of(*meta.original_destination)
        self._bind(conn)
        self._live.add(conn)
        m = self.metrics
        opened, gauge = m.tcp_open_total, m.tcp_open_connections
        adopted = meta.adopted  # opened (and counted) by the agent that handed it over
        for key in conn.tcp_keys:
            if not adopted:
                opened[key] = opened.get(key, 0) + 1
            gauge[key] = gauge.get(key, 0) + 1
        return conn

    def connection_endpoint(self, conn: _Conn, endpoint: tuple[str, int]) -> None:
        """The real endpoint behind what the connection dialled became known (conntrack)."""
        conn.meta.endpoint = endpoint
        self._rebind(conn)

    def connection_secured(self, conn: _Conn, peer_id: str | None) -> None:
        """The connection's tunnel state (`meta.mtls`, already set) changed after it was opened:
        an outbound tunnel fell back to plaintext, or its server named another trust domain than
        assumed. Its series move, as when identity changes."""
        self._rebind(conn)

    def connection_close(self, conn: _Conn, end: ConnectionEnd) -> None:
        self._live.discard(conn)
        m = self.metrics
        ended = end.ended or time.monotonic()
        duration_ms = (ended - conn.meta.started) * 1000.0 if conn.meta.started else 0.0
        error = end.error or ""
        closed, gauge, rd, wr = m.tcp_close_total, m.tcp_open_connections, m.tcp_read_bytes, m.tcp_write_bytes
        handed_over = end.handed_over  # it lives on in a newer agent, which counts its close
        for key in conn.tcp_keys:
            gauge[key] = gauge.get(key, 0) - 1
            rd[key] = rd.get(key, 0) + end.read_bytes
            wr[key] = wr.get(key, 0) + end.write_bytes
            if not handed_over:
                ckey = (*key, error)
                closed[ckey] = closed.get(ckey, 0) + 1
                m.observe(m.tcp_duration, key, duration_ms)

    def request_start(self, conn: _Conn, head: RequestHead) -> _Req:
        authority = head.authority
        if authority == conn.keys_for:
            keys = conn.keys
        else:
            suffix = (authority, conn.meta.protocol, *conn.tls)
            keys = conn.keys = tuple(b + suffix for b in conn.bases)
            conn.keys_for = authority
        started = head.started or time.monotonic()
        if conn.meta.first_bytes_at:
            # Its bytes waited for our upstream connection (or our identity hold): the client's
            # clock ran from their arrival, and so does ours.
            started, conn.meta.first_bytes_at = min(started, conn.meta.first_bytes_at), 0.0
        req = _Req(conn, head, keys, started)
        table = conn.route_table
        if table is not None and conn.route_bases:
            route = table.cache.get((head.method, head.path))   # RouteTable.route's hit, inlined
            if route is None or route is OTHER_ROUTE:
                route = table.route(head.method, head.path, head.grpc)
            rkeys = conn.route_keys.get(route)
            if rkeys is None:
                rkeys = conn.route_keys[route] = tuple(b + (route,) for b in conn.route_bases)
            req.route_keys = rkeys
        if head.adopted:  # counted (and tapped) by the agent that handed it over
            req.status = head.status or None
            return req
        m = self.metrics
        counts = m.request_total
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        if req.route_keys:
            counts = m.route_request_total
            for key in req.route_keys:
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
        # MetricsStore.observe inlined (one bucket search for all keys; calls are most of the
        # per-request cost, docs/bench.md "Hot path steps").
        bucket = bisect_left(m.bounds, ms)
        hist = m.response_latency
        for key in req.keys:
            buckets = hist.get(key)
            if buckets is None:
                buckets = hist[key] = m.new_buckets()
            buckets[bucket] += 1
            buckets[-1] += ms
        if req.route_keys:
            hist = m.route_latency
            for key in req.route_keys:
                buckets = hist.get(key)
                if buckets is None:
                    buckets = hist[key] = m.new_buckets()
                buckets[bucket] += 1
                buckets[-1] += ms
        if req.taps is not None:
            self._tap_response(req, status, headers, at)

    def request_end(self, req: _Req, end: RequestEnd) -> None:
        if req.done:
            return
        req.done = True
        status = req.status
        if status is not None and end.grpc_status is None and not end.reset_error and not req.head.grpc:
            labels = HTTP_LABELS.get(status) or classify(status, False, None, None)  # classify() inlined
        else:
            labels = classify(status, req.head.grpc, end.grpc_status, end.reset_error)
        counts = self.metrics.response_total
        for key in req.keys:
            rkey = key + labels
            counts[rkey] = counts.get(rkey, 0) + 1
        if req.route_keys:
            counts = self.metrics.route_response_total
            classification = (labels[2],)
            for key in req.route_keys:
                rkey = key + classification
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
            **_tls_fields(meta.mtls, direction),
        )

    def _tap_request(self, req: _Req) -> None:
        conn = req.conn
        if not conn.bases:
            return  # a duplicate observation: its first sighting already tapped it
        req.taps = self.taps.match(conn.src, conn.dst, conn.service, req.head, conn.directions)
        if req.taps is None:
            return
        head = req.head
        red = self.redaction  # secrets are taken out here: tap events leave the node
        headers = [pb.Header(name=k, value=v) for k, v in red.headers(head.headers)]
        path = red.path(head.path)
        for tap, direction in req.taps:
            ev = self._event(tap, req, direction)
            ev.request_init.CopyFrom(pb.RequestInit(method=head.method, scheme=head.scheme,
                                                    authority=head.authority, path=path,
                                                    headers=headers))
            self._emit(ev)

    def _tap_response(self, req: _Req, status: int, headers: list[tuple[str, str]], at: float) -> None:
        since = int(((at or time.monotonic()) - req.started) * 1e6)
        hdrs = [pb.Header(name=k, value=v) for k, v in self.redaction.headers(headers)]
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


def _tls_fields(mtls: str | None, direction: str) -> dict[str, Any]:
    """A tap event's mTLS fields: the identity verified is the client's on the inbound side."""
    if mtls is None:
        return {}
    return {"tls": True, "client_id" if direction == "inbound" else "server_id": mtls}

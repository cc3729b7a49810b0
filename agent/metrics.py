"""Counters and histograms in plain Python dicts, and their export.

The hot path increments `dict[label tuple] -> int` with no locks (each worker is one event loop).
A *snapshot* is the same data as plain, picklable dicts: `{metric name: {label values: value}}`,
where a histogram value is a list of non-cumulative bucket counts (aligned with LATENCY_BUCKETS_MS,
then +Inf) followed by the sum.

Workers hand the parent *increments*: every report interval `MetricsStore.take()` returns what was
counted since the last take (gauges as their net change) and starts afresh, so a worker holds one
interval's series, never every peer pair it ever saw. The parent's `NodeStore` adds them up into
the node's cumulative series, each with a creation stamp; it folds wire-supplied label values past
a per-workload cap into `[other]`, and evicts series idle for `idle_s` (Linkerd's retain-idle). A
series evicted and seen again is a new incarnation counting from 0 with a new `created_ms`: the
controller's contract (api/proto/nodemesh.proto, `Series`).

The parent exports the node's series two ways: Prometheus text through a custom prometheus-client
Collector (`metrics_export.SnapshotCollector`, a module of its own so that workers, which only count, never import
prometheus-client), and `Series` messages for the controller's MetricsReport. Names and label sets
are the contract in `api/model.py`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    ENDPOINT_LOOKUPS,
    ENDPOINT_RETRIES,
    IDENTITY_CORRECTIONS,
    IDENTITY_WAIT_MS,
    LABEL_OVERFLOW,
    LATENCY_BUCKETS_MS,
    OTHER_LABEL_VALUE,
    PEER_LABELS,
    REPORT_HISTORY_BYTES,
    REPORT_HISTORY_DROPPED,
    REPORT_HISTORY_SECONDS,
    REQUEST_TOTAL,
    RESPONSE_LABELS,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    ROUTE_LABELS,
    ROUTE_REQUEST_TOTAL,
    ROUTE_RESPONSE_LABELS,
    ROUTE_RESPONSE_LATENCY_MS,
    ROUTE_RESPONSE_TOTAL,
    SERIES_EVICTED,
    SPLICE_DECISIONS,
    TCP_CLOSE_TOTAL,
    TCP_CONNECTION_DURATION_MS,
    TCP_OPEN_CONNECTIONS,
    TCP_OPEN_TOTAL,
    TCP_READ_BYTES_TOTAL,
    TCP_WRITE_BYTES_TOTAL,
    TUNNEL_EVENTS,
    is_automatic_route,
)

Labels = tuple[str, ...]
Snapshot = dict[str, dict[Labels, float | list[float]]]

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# name -> (type, label names, help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    REQUEST_TOTAL: (COUNTER, PEER_LABELS, "Requests seen, by direction and source/destination workload."),
    RESPONSE_TOTAL: (COUNTER, PEER_LABELS + RESPONSE_LABELS, "Responses (or failed requests), classified."),
    RESPONSE_LATENCY_MS: (HISTOGRAM, PEER_LABELS, "Time from request to response headers, in ms."),
    TCP_OPEN_TOTAL: (COUNTER, PEER_LABELS, "Connections opened."),
    TCP_CLOSE_TOTAL: (COUNTER, PEER_LABELS + ("error",), "Connections closed; error empty when clean."),
    TCP_OPEN_CONNECTIONS: (GAUGE, PEER_LABELS, "Connections currently open."),
    TCP_READ_BYTES_TOTAL: (COUNTER, PEER_LABELS, "Bytes read from the source (client)."),
    TCP_WRITE_BYTES_TOTAL: (COUNTER, PEER_LABELS, "Bytes written to the source (client)."),
    TCP_CONNECTION_DURATION_MS: (HISTOGRAM, PEER_LABELS, "Connection lifetime, in ms."),
    ROUTE_REQUEST_TOTAL: (COUNTER, ROUTE_LABELS, "Requests seen, by route (rt_route) and workload pair."),
    ROUTE_RESPONSE_TOTAL: (COUNTER, ROUTE_LABELS + ROUTE_RESPONSE_LABELS,
                           "Responses (or failed requests) by route, classified as in response_total."),
    ROUTE_RESPONSE_LATENCY_MS: (HISTOGRAM, ROUTE_LABELS, "Time from request to response headers by route, in ms."),
}
ROUTE_METRICS = frozenset((ROUTE_REQUEST_TOTAL, ROUTE_RESPONSE_TOTAL, ROUTE_RESPONSE_LATENCY_MS))
# The agent's own metrics: exported on its /metrics, never reported to the controller, never evicted.
SELF_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    IDENTITY_WAIT_MS: (HISTOGRAM, ("outcome",),
                       "Waits for the identity of an unknown local-pod address before attributing, in ms."),
    IDENTITY_CORRECTIONS: (COUNTER, ("side",),
                           "Live connections moved from a pod that no longer holds the IP to its new owner."),
    ENDPOINT_LOOKUPS: (COUNTER, ("outcome",), "Conntrack lookups of the pod kube-proxy chose behind an address."),
    ENDPOINT_RETRIES: (COUNTER, ("via", "outcome"),
                       "Failed upstream connects to a chosen endpoint, tried once more (another endpoint or the Service)."),
    TUNNEL_EVENTS: (COUNTER, ("event", "reason"),
                    ("mTLS tunnels: originated, resumed, terminated, fallback, refused, carrier_opened, "
                     "carrier_accepted, carrier_closed, mux_unsupported (docs/agent-telemetry.md).")),
    SPLICE_DECISIONS: (COUNTER, ("outcome",),
                       ("Bulk opaque TCP connections moved by splice(2) (spliced), or kept on the copying "
                        "path and why (fds, sockmap, unavailable).")),
    SERIES_EVICTED: (COUNTER, (), "Idle series dropped (retain-idle)."),
    REPORT_HISTORY_BYTES: (GAUGE, (), "Bytes held by the report history (increments kept for the controller)."),
    REPORT_HISTORY_SECONDS: (GAUGE, (), "Age of the oldest interval in the report history, in seconds."),
    REPORT_HISTORY_DROPPED: (COUNTER, (), "Report intervals lost: out of the history before a controller stored them."),
    LABEL_OVERFLOW: (COUNTER, ("label",), "Requests whose wire label value was counted as [other] (cap)."),
}
ALL_METRICS = {**METRICS, **SELF_METRICS}
AUTHORITY_INDEX = PEER_LABELS.index("authority")
WORKLOAD_SLICE = slice(0, 4)  # direction, src_namespace, src_kind, src_name: the cap's scope
ROUTE_INDEX = ROUTE_LABELS.index("rt_route")
ROUTE_DST_SLICE = slice(4, 7)  # dst_namespace, dst_kind, dst_name: the route cap's scope


# classify()'s answer for a plain HTTP response without errors, per status (telemetry reads it first).
HTTP_LABELS: dict[int, tuple[str, str, str, str]] = {}


def classify(status: int | None, grpc: bool, grpc_status: int | None,
             reset_error: str | None) -> tuple[str, str, str, str]:
    """(status_code, grpc_status, classification, error) labels for one finished request.

    gRPC: a grpc-status (trailers, or headers of a trailers-only response) decides, whatever the
    HTTP status; a gRPC response that ends without one is a failure (the client sees an error).
    HTTP: 5xx is a failure. A reset or connection error before the request completed is a failure
    labelled with the error, unless a grpc-status had already arrived (the RPC had ended).
    """
    if status is not None and grpc_status is None and not reset_error and not grpc:
        labels = HTTP_LABELS.get(status)
        if labels is None:
            labels = (str(status), "", ("failure" if status >= 500 else "success"), "")
            if len(HTTP_LABELS) < 1000:  # any int a server sends: bounded
                HTTP_LABELS[status] = labels
        return labels
    code = "" if status is None else str(status)
    if grpc_status is not None:
        return code, str(grpc_status), ("failure" if grpc_status != 0 else "success"), ""
    if reset_error or status is None:
        return code, "", "failure", reset_error or "no response"
    if grpc:
        return code, "", "failure", "missing grpc-status"
    return code, "", ("failure" if status >= 500 else "success"), ""


class MetricsStore:
    """One process's cumulative series. Increment methods are the hot path: dicts, no locks."""

    __slots__ = (
        "bounds",
        "endpoint_lookups",
        "endpoint_retries",
        "identity_corrections",
        "identity_wait",
        "request_total",
        "response_latency",
        "response_total",
        "route_latency",
        "route_request_total",
        "route_response_total",
        "splice_decisions",
        "tcp_close_total",
        "tcp_duration",
        "tcp_open_connections",
        "tcp_open_total",
        "tcp_read_bytes",
        "tcp_write_bytes",
        "tunnel_events",
    )

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.request_total: dict[Labels, int] = {}
        self.response_total: dict[Labels, int] = {}
        self.response_latency: dict[Labels, list[float]] = {}
        self.tcp_open_total: dict[Labels, int] = {}
        self.tcp_close_total: dict[Labels, int] = {}
        self.tcp_open_connections: dict[Labels, int] = {}
        self.tcp_read_bytes: dict[Labels, int] = {}
        self.tcp_write_bytes: dict[Labels, int] = {}
        self.tcp_duration: dict[Labels, list[float]] = {}
        self.identity_wait: dict[Labels, list[float]] = {}
        self.identity_corrections: dict[Labels, int] = {}
        self.endpoint_lookups: dict[Labels, int] = {}
        self.endpoint_retries: dict[Labels, int] = {}
        self.tunnel_events: dict[Labels, int] = {}
        self.splice_decisions: dict[Labels, int] = {}
        self.route_request_total: dict[Labels, int] = {}
        self.route_response_total: dict[Labels, int] = {}
        self.route_latency: dict[Labels, list[float]] = {}

    def new_buckets(self) -> list[float]:
        return [0] * (len(self.bounds) + 2)  # buckets, +Inf, then the sum

    def observe(self, hist: dict[Labels, list[float]], key: Labels, ms: float) -> None:
        buckets = hist.get(key)
        if buckets is None:
            buckets = hist[key] = self.new_buckets()
        buckets[bisect_left(self.bounds, ms)] += 1
        buckets[-1] += ms

    def snapshot(self) -> Snapshot:
        """A copy of every series, safe to pickle and send while counting goes on."""
        out: Snapshot = {}
        for name, attr in _STORE_FIELDS:
            series = getattr(self, attr)
            out[name] = {k: list(v) for k, v in series.items()} if ALL_METRICS[name][0] == HISTOGRAM \
                else dict(series)
        return out

    def take(self) -> Snapshot:
        """Everything counted since the last take (gauges: their net change), and start afresh.
        The dicts themselves are handed over: no copy, and the worker's memory is one interval's."""
        out: Snapshot = {}
        for name, attr in _STORE_FIELDS:
            series = getattr(self, attr)
            if series:
                out[name] = series
                setattr(self, attr, {})
        return out

    def restore(self, taken: Snapshot) -> None:
        """Put back increments that could not be handed on (the parent link's buffer was full)."""
        for name, attr in _STORE_FIELDS:
            if name in taken:
                setattr(self, attr, merge([{name: taken[name]}, {name: getattr(self, attr)}])[name])


_STORE_FIELDS: tuple[tuple[str, str], ...] = (
    (REQUEST_TOTAL, "request_total"),
    (RESPONSE_TOTAL, "response_total"),
    (RESPONSE_LATENCY_MS, "response_latency"),
    (TCP_OPEN_TOTAL, "tcp_open_total"),
    (TCP_CLOSE_TOTAL, "tcp_close_total"),
    (TCP_OPEN_CONNECTIONS, "tcp_open_connections"),
    (TCP_READ_BYTES_TOTAL, "tcp_read_bytes"),
    (TCP_WRITE_BYTES_TOTAL, "tcp_write_bytes"),
    (TCP_CONNECTION_DURATION_MS, "tcp_duration"),
    (IDENTITY_WAIT_MS, "identity_wait"),
    (IDENTITY_CORRECTIONS, "identity_corrections"),
    (ENDPOINT_LOOKUPS, "endpoint_lookups"),
    (ENDPOINT_RETRIES, "endpoint_retries"),
    (TUNNEL_EVENTS, "tunnel_events"),
    (SPLICE_DECISIONS, "splice_decisions"),
    (ROUTE_REQUEST_TOTAL, "route_request_total"),
    (ROUTE_RESPONSE_TOTAL, "route_response_total"),
    (ROUTE_RESPONSE_LATENCY_MS, "route_latency"),
)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum snapshots series by series (counters, gauges and histogram buckets alike)."""
    out: Snapshot = {name: {} for name in METRICS}
    for snap in snapshots:
        for name, series in snap.items():
            target = out.setdefault(name, {})
            for key, value in series.items():
                have = target.get(key)
                if have is None:
                    target[key] = list(value) if isinstance(value, list) else value
                elif isinstance(value, list):
                    target[key] = [a + b for a, b in zip(have, value)]  # type: ignore[arg-type]
                else:
                    target[key] = have + value  # type: ignore[operator]
    return out


def without_gauges(snap: Snapshot) -> Snapshot:
    """What of a dead worker's snapshot stays true forever: counters and histograms, not open conns."""
    return {name: series for name, series in snap.items() if METRICS.get(name, (GAUGE,))[0] != GAUGE}


def to_series(snap: Snapshot, created: Callable[[str, Labels], int] | None = None) -> list[pb.Series]:
    """Snapshot -> MetricsReport.series (histograms: non-cumulative bucket_counts + sum); the
    agent's own metrics stay home. `created(name, key)` stamps each series' incarnation."""
    out: list[pb.Series] = []
    for name, series in snap.items():
        if name not in METRICS:
            continue
        kind, label_names, _ = METRICS[name]
        for key, value in series.items():
            labels = dict(zip(label_names, key))
            stamp = created(name, key) if created is not None else 0
            if kind == HISTOGRAM:
                counts = value[:-1]  # type: ignore[index]
                out.append(pb.Series(name=name, labels=labels, bucket_counts=[int(c) for c in counts],
                                     sum=float(value[-1]), created_ms=stamp))  # type: ignore[index]
            else:
                out.append(pb.Series(name=name, labels=labels, value=float(value),  # type: ignore[arg-type]
                                     created_ms=stamp))
    return out


def from_series(series: Iterable[pb.Series]) -> Snapshot:
    """MetricsReport.series -> Snapshot (the controller side, and tests)."""
    out: Snapshot = {name: {} for name in METRICS}
    for s in series:
        kind, label_names, _ = METRICS[s.name]
        key = tuple(s.labels.get(n, "") for n in label_names)
        out[s.name][key] = [*s.bucket_counts, s.sum] if kind == HISTOGRAM else s.value
    return out


class NodeStore:
    """The node's cumulative series: worker increments added up, wire labels capped, idle evicted.

    Each series remembers when its current incarnation was created (epoch ms, reported as
    `Series.created_ms`) and when it last changed (monotonic). `evict()` drops series that have not
    changed for `idle_s` — gauges only at 0, and only series changed before `safe_before` (the
    caller passes the time of a report the controller got after that change, so an evicted series'
    last counts were delivered). The agent's own metrics (SELF_METRICS) are never evicted.

    Label cap: a workload (direction + source workload) may have at most `max_authorities`
    distinct authority values live; further ones are counted under `[other]`
    (`nodemesh_label_overflow_total{label="authority"}` counts the requests), so one pod sending
    20,000 Host headers makes at most `max_authorities` + 1 series per metric, and every request
    is still counted.
    """

    def __init__(self, *, idle_s: float = 600.0, max_authorities: int = 100, max_routes: int = 100,
                 clock: Callable[[], float] = time.monotonic, wall_ms: Callable[[], int] | None = None) -> None:
        self.idle_s = idle_s
        self.max_authorities = max_authorities
        self.max_routes = max_routes
        self._clock = clock
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.series: Snapshot = {name: {} for name in ALL_METRICS}
        self.created: dict[tuple[str, Labels], int] = {}
        self.touched: dict[tuple[str, Labels], float] = {}
        self._authorities: dict[Labels, set[str]] = {}   # workload -> authorities with live series
        self._routes: dict[Labels, set[str]] = {}        # destination workload -> routes with live series
        # What was added since the last take_pending() (capped keys; peer counters and histograms
        # only): the controller link's per-interval increments (agent/history.py).
        self.pending: Snapshot = {}
        self.track_pending = False  # set when a controller link takes them (else they would pile up)
        self.evicted = 0
        self.overflowed: float = 0  # requests folded into [other] (snapshot numbers are floats)

    def add(self, delta: Snapshot) -> None:
        now = self._clock()
        stamp = 0
        for name, series in delta.items():
            if name not in ALL_METRICS:
                continue
            target = self.series[name]
            route = name in ROUTE_METRICS
            peer = not route and name in METRICS
            pending = self.pending.setdefault(name, {}) if self.track_pending and name in _INCREMENTAL \
                else None
            for key, value in series.items():
                if peer and key[AUTHORITY_INDEX]:
                    capped = self._cap(key)
                    if capped is not key and name == REQUEST_TOTAL:
                        self.overflowed += value  # type: ignore[operator]
                        overflow = self.series[LABEL_OVERFLOW]
                        overflow[("authority",)] = overflow.get(("authority",), 0) + value  # type: ignore[operator]
                    key = capped
                elif route:
                    capped = self._cap_route(key)
                    if capped is not key and name == ROUTE_REQUEST_TOTAL:
                        overflow = self.series[LABEL_OVERFLOW]
                        overflow[("rt_route",)] = overflow.get(("rt_route",), 0) + value  # type: ignore[operator]
                    key = capped
                have = target.get(key)
                if have is None:
                    target[key] = list(value) if isinstance(value, list) else value
                    stamp = stamp or self._wall_ms()
                    self.created[(name, key)] = stamp
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        have[i] += v  # type: ignore[index]
                else:
                    target[key] = have + value  # type: ignore[operator]
                self.touched[(name, key)] = now
                if pending is not None:
                    was = pending.get(key)
                    if was is None:
                        pending[key] = list(value) if isinstance(value, list) else value
                    elif isinstance(value, list):
                        for i, v in enumerate(value):
                            was[i] += v  # type: ignore[index]
                    else:
                        pending[key] = was + value  # type: ignore[operator]

    def take_pending(self) -> Snapshot:
        """The peer counters and histograms added since the last take (capped keys), and start
        afresh: one report interval's increments."""
        out = {name: series for name, series in self.pending.items() if series}
        self.pending = {}
        return out

    def gauges(self) -> Snapshot:
        """The peer gauges' current values (open connections), for a live report."""
        return {name: dict(self.series[name]) for name in METRICS if METRICS[name][0] == GAUGE}

    def _cap(self, key: Labels) -> Labels:
        workload = key[WORKLOAD_SLICE]
        authority = key[AUTHORITY_INDEX]
        seen = self._authorities.get(workload)
        if seen is None:
            seen = self._authorities[workload] = set()
        if authority in seen:
            return key
        if len(seen) < self.max_authorities:
            seen.add(authority)
            return key
        return (*key[:AUTHORITY_INDEX], OTHER_LABEL_VALUE, *key[AUTHORITY_INDEX + 1:])

    def _cap_route(self, key: Labels) -> Labels:
        """At most `max_routes` live routes per destination workload on this node (every worker's
        table caps its own; together they could learn more); `[other]`/`[DEFAULT]` take no place."""
        route = key[ROUTE_INDEX]
        if not is_automatic_route(route):  # [other], [DEFAULT], configured names
            return key
        scope = key[ROUTE_DST_SLICE]
        seen = self._routes.get(scope)
        if seen is None:
            seen = self._routes[scope] = set()
        if route in seen:
            return key
        if len(seen) < self.max_routes:
            seen.add(route)
            return key
        return (*key[:ROUTE_INDEX], OTHER_LABEL_VALUE, *key[ROUTE_INDEX + 1:])

    def remove_gauge(self, delta: dict[Labels, float]) -> None:
        """Take a dead worker's open connections out of the gauge (those sockets died with it)."""
        gauge = self.series[TCP_OPEN_CONNECTIONS]
        now = self._clock()
        for key, value in delta.items():
            if key[AUTHORITY_INDEX]:
                key = self._cap(key)
            if key in gauge:
                gauge[key] -= value  # type: ignore[operator]
                self.touched[(TCP_OPEN_CONNECTIONS, key)] = now

    def evict(self, safe_before: float | None = None) -> int:
        """Drop series idle for idle_s (and changed before `safe_before`, monotonic)."""
        horizon = self._clock() - self.idle_s
        if safe_before is not None:
            horizon = min(horizon, safe_before)
        dropped = 0
        for name in METRICS:
            series = self.series[name]
            gauge = METRICS[name][0] == GAUGE
            for key in [k for k in series if self.touched.get((name, k), 0.0) < horizon]:
                if gauge and series[key]:
                    continue
                del series[key]
                self.created.pop((name, key), None)
                self.touched.pop((name, key), None)
                dropped += 1
        if dropped:
            self.evicted += dropped
            ev = self.series[SERIES_EVICTED]
            was = ev.get((), 0)
            ev[()] = (0 if isinstance(was, list) else was) + dropped  # a counter: never a list
            live: dict[Labels, set[str]] = {}
            routes: dict[Labels, set[str]] = {}
            for name in METRICS:
                if name in ROUTE_METRICS:
                    for key in self.series[name]:
                        if is_automatic_route(key[ROUTE_INDEX]):
                            routes.setdefault(key[ROUTE_DST_SLICE], set()).add(key[ROUTE_INDEX])
                    continue
                for key in self.series[name]:
                    if key[AUTHORITY_INDEX]:
                        live.setdefault(key[WORKLOAD_SLICE], set()).add(key[AUTHORITY_INDEX])
            self._authorities = live
            self._routes = routes
        return dropped

    def created_ms(self, name: str, key: Labels) -> int:
        return self.created.get((name, key), 0)

    def snapshot(self) -> Snapshot:
        return {name: dict(series) for name, series in self.series.items()}

    def __len__(self) -> int:
        return sum(len(self.series[name]) for name in METRICS)


# Peer metrics whose increments are reported (gauges are sent as their current value instead).
_INCREMENTAL = frozenset(name for name, (kind, _, _) in METRICS.items() if kind != GAUGE)


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


"""Cumulative counters and histograms in plain Python dicts, and their export.

The hot path increments `dict[label tuple] -> int` with no locks (each worker is one event loop).
A *snapshot* is the same data as plain, picklable dicts: `{metric name: {label values: value}}`,
where a histogram value is a list of non-cumulative bucket counts (aligned with LATENCY_BUCKETS_MS,
then +Inf) followed by the sum. Workers send snapshots to the parent, which merges them and exports
them two ways: Prometheus text through a custom prometheus-client Collector (`SnapshotCollector`, in
`metrics_export` so that workers, which only count, never import prometheus-client), and `Series`
messages for the controller's MetricsReport. Names and label sets are the contract in `api/model.py`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    LATENCY_BUCKETS_MS,
    PEER_LABELS,
    REQUEST_TOTAL,
    RESPONSE_LABELS,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    TCP_CLOSE_TOTAL,
    TCP_CONNECTION_DURATION_MS,
    TCP_OPEN_CONNECTIONS,
    TCP_OPEN_TOTAL,
    TCP_READ_BYTES_TOTAL,
    TCP_WRITE_BYTES_TOTAL,
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
}


def classify(status: int | None, grpc: bool, grpc_status: int | None,
             reset_error: str | None) -> tuple[str, str, str, str]:
    """(status_code, grpc_status, classification, error) labels for one finished request.

    gRPC: a grpc-status (trailers, or headers of a trailers-only response) decides, whatever the
    HTTP status; a gRPC response that ends without one is a failure (the client sees an error).
    HTTP: 5xx is a failure. A reset or connection error before the request completed is a failure
    labelled with the error, unless a grpc-status had already arrived (the RPC had ended).
    """
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
        "request_total",
        "response_latency",
        "response_total",
        "tcp_close_total",
        "tcp_duration",
        "tcp_open_connections",
        "tcp_open_total",
        "tcp_read_bytes",
        "tcp_write_bytes",
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

    def observe(self, hist: dict[Labels, list[float]], key: Labels, ms: float) -> None:
        buckets = hist.get(key)
        if buckets is None:
            buckets = hist[key] = [0] * (len(self.bounds) + 2)  # buckets, +Inf, then the sum
        buckets[bisect_left(self.bounds, ms)] += 1
        buckets[-1] += ms

    def snapshot(self) -> Snapshot:
        """A copy of every series, safe to pickle and send while counting goes on."""
        return {
            REQUEST_TOTAL: dict(self.request_total),
            RESPONSE_TOTAL: dict(self.response_total),
            RESPONSE_LATENCY_MS: {k: list(v) for k, v in self.response_latency.items()},
            TCP_OPEN_TOTAL: dict(self.tcp_open_total),
            TCP_CLOSE_TOTAL: dict(self.tcp_close_total),
            TCP_OPEN_CONNECTIONS: dict(self.tcp_open_connections),
            TCP_READ_BYTES_TOTAL: dict(self.tcp_read_bytes),
            TCP_WRITE_BYTES_TOTAL: dict(self.tcp_write_bytes),
            TCP_CONNECTION_DURATION_MS: {k: list(v) for k, v in self.tcp_duration.items()},
        }


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


def to_series(snap: Snapshot) -> list[pb.Series]:
    """Snapshot -> MetricsReport.series (histograms: non-cumulative bucket_counts + sum)."""
    out: list[pb.Series] = []
    for name, series in snap.items():
        kind, label_names, _ = METRICS[name]
        for key, value in series.items():
            labels = dict(zip(label_names, key))
            if kind == HISTOGRAM:
                counts = value[:-1]  # type: ignore[index]
                out.append(pb.Series(name=name, labels=labels, bucket_counts=[int(c) for c in counts],
                                     sum=float(value[-1])))  # type: ignore[index]
            else:
                out.append(pb.Series(name=name, labels=labels, value=float(value)))  # type: ignore[arg-type]
    return out


def from_series(series: Iterable[pb.Series]) -> Snapshot:
    """MetricsReport.series -> Snapshot (the controller side, and tests)."""
    out: Snapshot = {name: {} for name in METRICS}
    for s in series:
        kind, label_names, _ = METRICS[s.name]
        key = tuple(s.labels.get(n, "") for n in label_names)
        out[s.name][key] = [*s.bucket_counts, s.sum] if kind == HISTOGRAM else s.value
    return out


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def __getattr__(name: str) -> object:
    # `from nodemesh.agent.metrics import SnapshotCollector` still works, importing prometheus-client
    # only when someone asks for the collector (the parent's admin server, tests), never in workers.
    if name == "SnapshotCollector":
        from nodemesh.agent.metrics_export import SnapshotCollector

        return SnapshotCollector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

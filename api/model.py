"""The small shared model: ports, label names, workload identity and resource selectors.

Everything here is plain data with no I/O, imported by every room.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Ports (ARCHITECTURE.md "Ports").
OUTBOUND_PORT = 4140
INBOUND_PORT = 4143
ADMIN_PORT = 4191
# The conntrack zone of the agent's transparent upstream connections (original direction): the
# redirector's raw OUTPUT rule puts them there, the agent's conntrack lookups look there.
CONNTRACK_ZONE = 4140
CONTROLLER_GRPC_PORT = 8085
CONTROLLER_WEB_PORT = 8084

# The largest gRPC message either side accepts. Cumulative reports carry every series an agent has
# seen (~3 KB per peer pair), identity snapshots every pod of the cluster, `stat po -A` every pod:
# gRPC's 4 MiB default is ~1200 peer pairs, ~20k pods.
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
)

# A Namespace carrying this label (or annotation) with value "disabled" is never captured.
CAPTURE_LABEL = "nodemesh.io/capture"
CAPTURE_DISABLED = "disabled"

DIRECTIONS = ("outbound", "inbound")
CLASSIFICATIONS = ("success", "failure")

# Linkerd's proxy latency buckets, in milliseconds.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)

# Canonical resource types, and every spelling kubectl accepts for them.
RESOURCE_ALIASES: dict[str, str] = {}
_TYPES = {
    "namespace": ("ns", "namespace", "namespaces"),
    "deployment": ("deploy", "deployment", "deployments"),
    "statefulset": ("sts", "statefulset", "statefulsets"),
    "daemonset": ("ds", "daemonset", "daemonsets"),
    "job": ("job", "jobs"),
    "replicaset": ("rs", "replicaset", "replicasets"),
    "pod": ("po", "pod", "pods"),
    "service": ("svc", "service", "services"),
    "all": ("all",),
}
for _canonical, _spellings in _TYPES.items():
    for _s in _spellings:
        RESOURCE_ALIASES[_s] = _canonical

# Short forms used when printing `TYPE/NAME` (Linkerd prints e.g. `deploy/web`).
SHORT_TYPE = {
    "namespace": "ns", "deployment": "deploy", "statefulset": "sts", "daemonset": "ds",
    "job": "job", "replicaset": "rs", "pod": "po", "service": "svc",
}
# Kubernetes `kind` for each canonical type.
KIND_OF_TYPE = {
    "namespace": "Namespace", "deployment": "Deployment", "statefulset": "StatefulSet",
    "daemonset": "DaemonSet", "job": "Job", "replicaset": "ReplicaSet", "pod": "Pod",
    "service": "Service",
}
TYPE_OF_KIND = {v: k for k, v in KIND_OF_TYPE.items()}


# Stat windows: the controller keeps 1 s buckets for an hour.
MIN_WINDOW_S = 10
MAX_WINDOW_S = 3600
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1}


class WindowError(ValueError):
    """A time window the user typed is malformed or out of [10 s, 1 h]."""


def parse_window(text: str, *, bare_seconds: bool = False) -> int:
    """`10s`, `1m`, `90s`, `1m30s`, `1h` (and, with bare_seconds, `60`) -> seconds in [10 s, 1 h]."""
    raw = text.strip()
    if bare_seconds and raw.isdigit():
        total = float(raw)
    else:
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(raw):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if not raw or pos != len(raw):
            raise WindowError(f"invalid time window {text!r}: expected a duration such as 10s, 1m, 90s or 1h")
    if total < MIN_WINDOW_S:
        raise WindowError(f"time window {text!r} is too short: the minimum is {MIN_WINDOW_S}s")
    if total > MAX_WINDOW_S:
        raise WindowError(f"time window {text!r} is too long: the maximum is {MAX_WINDOW_S // 3600}h")
    return int(total)


class SelectorError(ValueError):
    """A resource selector the user typed cannot be understood."""


@dataclass(frozen=True, slots=True)
class Selector:
    """`TYPE[/NAME]` as kubectl writes it, resolved to a canonical type."""

    type: str  # canonical: "deployment", "pod", "namespace", ..., or "all"
    name: str = ""  # empty: every resource of the type

    def __str__(self) -> str:
        short = SHORT_TYPE.get(self.type, self.type)
        return f"{short}/{self.name}" if self.name else short


def parse_selector(text: str) -> Selector:
    """Parse `deploy/web`, `po/voting-7d9f`, `ns`, `deployments` ... into a Selector."""
    if not text or text.count("/") > 1:
        raise SelectorError(f"invalid resource selector {text!r}: expected TYPE or TYPE/NAME")
    kind, _, name = text.partition("/")
    canonical = RESOURCE_ALIASES.get(kind.lower())
    if canonical is None:
        raise SelectorError(f"unknown resource type {kind!r}")
    if "/" in text and not name:
        raise SelectorError(f"invalid resource selector {text!r}: empty name")
    if canonical == "all" and name:
        raise SelectorError("'all' takes no name")
    return Selector(canonical, name)


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """What owns a pod: deployment, statefulset, daemonset, job, or the pod itself."""

    namespace: str
    kind: str  # canonical type: "deployment", "statefulset", "daemonset", "job", "pod"
    name: str

    def __str__(self) -> str:
        return f"{SHORT_TYPE.get(self.kind, self.kind)}/{self.name}"


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Who an IP is: the pod behind it and the workload that owns that pod."""

    ip: str
    namespace: str
    pod: str
    workload: WorkloadRef
    node: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    ready: bool = True


# The identity of an address no pod owns (a node, an external host).
UNKNOWN_NAMESPACE = ""
UNKNOWN_KIND = "unknown"


# ---------------------------------------------------------------------------- metric contract
# Names and labels of the series agents export on /metrics and report to the controller
# (MetricsReport.series). Names follow Linkerd's proxy metrics where the concept matches.
REQUEST_TOTAL = "request_total"
RESPONSE_TOTAL = "response_total"                   # + status_code, grpc_status, classification, error
RESPONSE_LATENCY_MS = "response_latency_ms"         # histogram, LATENCY_BUCKETS_MS, time to response headers
TCP_OPEN_TOTAL = "tcp_open_total"
TCP_CLOSE_TOTAL = "tcp_close_total"                 # + error ("" on a clean close)
TCP_OPEN_CONNECTIONS = "tcp_open_connections"       # gauge
TCP_READ_BYTES_TOTAL = "tcp_read_bytes_total"       # bytes read from the source (client)
TCP_WRITE_BYTES_TOTAL = "tcp_write_bytes_total"     # bytes written to the source (client)
TCP_CONNECTION_DURATION_MS = "tcp_connection_duration_ms"  # histogram, LATENCY_BUCKETS_MS

# Labels on every series: who called whom, as seen in which direction. `*_kind` is a canonical
# type (deployment, statefulset, daemonset, job, pod) or UNKNOWN_KIND with `*_name` = the IP.
# `dst_service` is "name.namespace" when the caller dialled a Service ClusterIP, else "".
# mTLS (agent/tunnel.py), as Linkerd's proxy labels: `tls` is "true" when the connection crossed
# nodes inside an mTLS tunnel, else ""; then `client_id` (inbound side) or `server_id` (outbound
# side) is the peer's SPIFFE ID from its verified certificate. `nodemesh edges` reads them.
PEER_LABELS = (
    "direction",
    "src_namespace", "src_kind", "src_name", "src_pod",
    "dst_namespace", "dst_kind", "dst_name", "dst_pod",
    "dst_service", "authority", "protocol",
    "tls", "client_id", "server_id",
)
NO_TLS = ("", "", "")  # the tls, client_id, server_id labels of a connection outside any tunnel


def tls_labels(peer_id: str | None, direction: str) -> tuple[str, str, str]:
    """(tls, client_id, server_id) for a connection whose verified peer is `peer_id` (None: no
    tunnel): the inbound side verified its client, the outbound side its server."""
    if peer_id is None:
        return NO_TLS
    return ("true", peer_id, "") if direction == "inbound" else ("true", "", peer_id)
RESPONSE_LABELS = ("status_code", "grpc_status", "classification", "error")

# Per-route families (agent/routes.py names the route): Linkerd's `route_*` proxy metrics, kept apart
# from the peer families above so route cardinality never touches them (or `stat`). Workload level
# only (no pods, no authority, no protocol); an unknown peer's `*_name` is "" (not its IP), and
# `rt_route` is capped per destination workload (`[other]` past it), so a label set here is
# bounded by workload pairs x routes.
ROUTE_REQUEST_TOTAL = "route_request_total"
ROUTE_RESPONSE_TOTAL = "route_response_total"               # + classification
ROUTE_RESPONSE_LATENCY_MS = "route_response_latency_ms"     # histogram, LATENCY_BUCKETS_MS
ROUTE_LABELS = (
    "direction",
    "src_namespace", "src_kind", "src_name",
    "dst_namespace", "dst_kind", "dst_name",
    "dst_service", "rt_route",
)
ROUTE_RESPONSE_LABELS = ("classification",)
DEFAULT_ROUTE = "[DEFAULT]"   # a request with no path to name (CONNECT, OPTIONS *)


def is_automatic_route(route: str) -> bool:
    """Was this rt_route named from the wire (agent/routes.py: `/pkg.Service/Method` or `METHOD /path`)?
    Only those take a place under the route caps: a configured route's name was chosen by someone,
    so it can neither explode nor be folded into [other]."""
    if route.startswith("/"):
        return True
    method, _, rest = route.partition(" ")
    return rest.startswith("/") and method.isupper()

# Agent self-metrics (not per-peer): 1 while this node's capture rules are installed, else 0.
# No labels; Prometheus adds the scrape target's `node`. Alongside prometheus-client's process_*.
CAPTURE_INSTALLED = "nodemesh_capture_installed"    # gauge
# Identity at work (agent /metrics only, never reported to the controller):
IDENTITY_WAIT_MS = "nodemesh_identity_wait_ms"      # histogram {outcome=known|timeout}: a connection
                                                    # from an unknown local-pod IP waited for its identity
IDENTITY_CORRECTIONS = "nodemesh_identity_corrections_total"  # {side=src|dst}: a live connection moved
                                                    # from a pod that no longer holds the IP to its new owner
ENDPOINT_LOOKUPS = "nodemesh_endpoint_lookups_total"  # {outcome=found|none|failed}: conntrack asked which
                                                    # pod kube-proxy chose behind an unknown address
ENDPOINT_RETRIES = "nodemesh_endpoint_retries_total"  # {via=endpoint|service, outcome=connected|failed}:
                                                    # an upstream connect to an endpoint the agent chose
                                                    # failed and was tried once more
TUNNEL_EVENTS = "nodemesh_tunnel_events_total"    # {event=originated|resumed|terminated|fallback|refused,
                                                    # reason}: the node's mTLS tunnels (agent/tunnel.py);
                                                    # reason is empty for the first three
SERIES_EVICTED = "nodemesh_series_evicted_total"    # idle series dropped (retain-idle)
LABEL_OVERFLOW = "nodemesh_label_overflow_total"    # {label}: values folded into OTHER_LABEL_VALUE
                                                    # (label="authority", or "rt_route" for the route cap)
# The report history (agent/history.py): increments kept for the controller, replayed after it restarts.
REPORT_HISTORY_BYTES = "nodemesh_report_history_bytes"      # gauge: compressed bytes held
REPORT_HISTORY_SECONDS = "nodemesh_report_history_seconds"  # gauge: age of the oldest interval held
REPORT_HISTORY_DROPPED = "nodemesh_report_history_dropped_total"  # intervals lost before any controller stored them
# A wire-supplied label value (authority) past the per-workload cap is counted under this value.
OTHER_LABEL_VALUE = "[other]"

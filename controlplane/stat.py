"""StatSummary and Edges: Linkerd's `viz stat` / `viz edges` semantics over the aggregator.

Which observations make a row (as Linkerd does it):

* a resource's own row is its INBOUND view: requests observed with direction=inbound whose
  destination belongs to the resource (what its callers got from it, measured at its side);
* services (`svc`) are seen only by their clients: outbound observations with dst_service;
* `--from X`: X's OUTBOUND view, one row per destination resource that X called;
* `--to Y`: the callers' OUTBOUND view of Y, one row per calling resource.

With `--from`/`--to`, only rows with traffic in the window are returned (a row per possible peer
would be noise); without them every resource of the type gets a row, traffic or not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from nodemesh.api import labelselector
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.labelselector import Requirement
from nodemesh.api.model import MAX_WINDOW_S, MIN_WINDOW_S, PEER_LABELS, RESOURCE_ALIASES, SHORT_TYPE
from nodemesh.controlplane.aggregate import (
    BOUNDS,
    COLUMN,
    LABEL_INDEX,
    LAT0,
    NCOL,
    Aggregator,
    GroupSums,
    SeriesKey,
    SeriesStore,
    Totals,
    histogram_quantiles,
)
from nodemesh.controlplane.registry import ResourceInfo, WorkloadRegistry

DEFAULT_WINDOW_S = 60
WORKLOAD_TYPES = ("deployment", "statefulset", "daemonset", "job")
# What `stat all` lists, in this order (as Linkerd prints it: workloads, then pods, then services).
ALL_TYPES = ("deployment", "daemonset", "statefulset", "job", "pod", "service")
STAT_TYPES = frozenset((*ALL_TYPES, "namespace", "replicaset", "all"))
EDGE_TYPES = frozenset((*WORKLOAD_TYPES, "pod", "replicaset", "namespace", "all"))
_DIR = LABEL_INDEX["direction"]
_DST_SERVICE = LABEL_INDEX["dst_service"]


class StatError(ValueError):
    """A request the user got wrong; the message is one line meant for them."""


# ------------------------------------------------------------------ label selectors (-l)
def parse_label_selector(text: str) -> list[Requirement]:
    """Kubernetes' grammar (api/labelselector.py); a selector that does not parse is the user's error."""
    try:
        return labelselector.parse(text)
    except labelselector.LabelSelectorError as exc:
        raise StatError(str(exc)) from None


# ------------------------------------------------------------------ matching keys to resources
Predicate = Callable[[SeriesKey], bool]
Rows = RepeatedCompositeFieldContainer[pb.StatRow]   # a StatResponse's rows


def side_predicate(registry: WorkloadRegistry, side: str, namespace: str, type_: str, name: str) -> Predicate:
    """Does a series' `side` ("src" or "dst") belong to the resource (name "" = any of the type)?"""
    ns_i, kind_i = LABEL_INDEX[f"{side}_namespace"], LABEL_INDEX[f"{side}_kind"]
    name_i, pod_i = LABEL_INDEX[f"{side}_name"], LABEL_INDEX[f"{side}_pod"]
    if type_ == "namespace":
        return (lambda k: k[ns_i] != "") if not name else (lambda k: k[ns_i] == name)
    if type_ in WORKLOAD_TYPES:
        if not name:
            return lambda k: k[ns_i] == namespace and k[kind_i] == type_
        return lambda k: k[ns_i] == namespace and k[kind_i] == type_ and k[name_i] == name
    if type_ == "pod":
        if not name:
            return lambda k: k[ns_i] == namespace and k[pod_i] != ""
        return lambda k: k[ns_i] == namespace and k[pod_i] == name
    if type_ == "replicaset":
        # ReplicaSets are not a label: a pod belongs to one by name (`<rs>-<suffix>`), which
        # also holds for pods already gone from the cluster but still in the window.
        info = registry.resource("replicaset", namespace, name) if name else None
        pods = {p.name for p in info.pods} if info else set()
        prefix = name + "-"
        if not name:
            rs_names = {r.name + "-" for r in registry.resources("replicaset", namespace)}
            return lambda k: k[ns_i] == namespace and any(k[pod_i].startswith(p) for p in rs_names)
        return lambda k: k[ns_i] == namespace and (k[pod_i] in pods or k[pod_i].startswith(prefix))
    if type_ == "service":
        if side == "dst":
            if not name:
                suffix = "." + namespace
                return lambda k: k[_DST_SERVICE].endswith(suffix)
            full = f"{name}.{namespace}"
            return lambda k: k[_DST_SERVICE] == full
        info = registry.resource("service", namespace, name) if name else None
        svc_pods = {p.name for p in info.pods} if info else set()
        return lambda k: k[ns_i] == namespace and k[pod_i] in svc_pods
    raise StatError(f"unknown resource type {type_!r}")


def _direction(value: str) -> Predicate:
    return lambda k: k[_DIR] == value


# ------------------------------------------------------------------ StatSummary
@dataclass
class MeshView:
    """What MESHED needs: nodes running a connected, ready agent, and captured namespaces."""

    ready_nodes: set[str]
    captured_namespaces: set[str]


def canonical_type(type_: str) -> str:
    canonical = RESOURCE_ALIASES.get(type_.lower())
    if canonical is None:
        raise StatError(f"unknown resource type {type_!r}")
    return canonical


def check_window(window_s: int) -> int:
    if window_s == 0:
        return DEFAULT_WINDOW_S
    if window_s < MIN_WINDOW_S:
        raise StatError(f"time window {window_s}s is too short: the minimum is {MIN_WINDOW_S}s")
    if window_s > MAX_WINDOW_S:
        raise StatError(f"time window {window_s}s is too long: the maximum is {MAX_WINDOW_S // 60}m")
    return window_s


def _check_namespace(registry: WorkloadRegistry, namespace: str) -> None:
    if namespace and namespace != "default" and namespace not in registry.namespaces():
        raise StatError(f'namespace "{namespace}" not found')


def stat_summary(registry: WorkloadRegistry, aggregator: SeriesStore, mesh: MeshView,
                 req: pb.StatRequest, now: float | None = None) -> pb.StatResponse:
    resp = pb.StatResponse()
    try:
        _stat_rows(registry, aggregator, mesh, req, now, resp.rows)
    except StatError as exc:
        return pb.StatResponse(error=str(exc))
    return resp


def _peer(req_res: pb.Resource, default_ns: str, flag: str) -> tuple[str, str, str] | None:
    if not req_res.type:
        return None
    type_ = canonical_type(req_res.type)
    if type_ == "all":
        raise StatError(f"'all' is not a valid resource for {flag}")
    return (req_res.namespace or default_ns, type_, req_res.name)


def _selector_type(selector: pb.Resource, supported: frozenset[str], verb: str) -> str:
    """The request's canonical resource type, if `verb` (stat, edges) supports it."""
    if not selector.type:
        raise StatError("no resource type given")
    type_ = canonical_type(selector.type)
    if type_ not in supported:
        raise StatError(f"resource type {type_!r} is not supported by {verb}")
    return type_


def _stat_rows(registry: WorkloadRegistry, aggregator: SeriesStore, mesh: MeshView, req: pb.StatRequest,
               now: float | None, rows: Rows) -> None:
    """The request's rows, added to `rows` (the response's: built in place, not copied in)."""
    type_ = _selector_type(req.selector, STAT_TYPES, "stat")
    window = check_window(int(req.window_seconds))
    namespace = "" if req.all_namespaces else (req.selector.namespace or "default")
    scope = None if req.all_namespaces else namespace
    if type_ == "namespace":
        scope = None
    else:
        _check_namespace(registry, namespace)
    src = _peer(getattr(req, "from"), namespace or "default", "--from")
    dst = _peer(req.to, namespace or "default", "--to")
    if src and dst:
        raise StatError("--from and --to cannot be used together")
    if type_ == "all" and (src or dst):
        raise StatError("--from and --to cannot be used with resource type 'all'")
    if req.selector.name and type_ == "all":
        raise StatError("'all' takes no name")
    requirements = parse_label_selector(req.label_selector) if req.label_selector else []

    types = ALL_TYPES if type_ == "all" else (type_,)
    for t in types:
        resources = _resources(registry, t, scope)
        if req.selector.name:
            resources = [r for r in resources if r.name == req.selector.name]
            if not resources:
                where = "" if t == "namespace" else f' in namespace "{namespace or "default"}"'
                raise StatError(f'{t} "{req.selector.name}" not found{where}')
        if requirements:
            resources = [r for r in resources if all(q.matches(r.labels) for q in requirements)]
        _rows_for(registry, aggregator, mesh, t, resources, src, dst, window, now, rows)


def _rows_for(registry: WorkloadRegistry, aggregator: SeriesStore, mesh: MeshView, type_: str,
              resources: list[ResourceInfo], src: tuple[str, str, str] | None,
              dst: tuple[str, str, str] | None, window: int, now: float | None, out: Rows) -> None:
    # The side of each series that a row stands for, and the filter every series must pass.
    if src:
        row_side = "dst"
        base = _and(_direction("outbound"), side_predicate(registry, "src", *src))
    elif dst:
        row_side = "src"
        base = _and(_direction("outbound"), side_predicate(registry, "dst", *dst))
    elif type_ == "service":
        row_side, base = "dst", _direction("outbound")
    else:
        row_side, base = "dst", _direction("inbound")
    rows = []
    row_id = _row_id_of(type_, row_side)
    if row_id is not None and isinstance(aggregator, Aggregator):
        # Summed by numpy per row over the window's matrix, and the rows' numbers computed over
        # the grouped matrix: no Totals per key or per row.
        rid = row_id
        group = lambda k: rid(k) if base(k) else None
        grouping = _stat_grouping(aggregator, type_, row_side, src or dst, "outbound" if src or dst else
                                  ("outbound" if type_ == "service" else "inbound"), "src" if src else "dst")
        got = aggregator.group_sums(window, now, group, grouping=grouping)
        _rows_of_sums(type_, resources, got, _counter(registry, mesh), bool(src or dst), out)
        return
    by_key = aggregator.totals_by_key(window, now, base)
    grouped = _group_by_row(type_, row_side, by_key, window)
    for r in resources:
        if grouped is not None:
            totals = grouped.get(_row_id(type_, r), Totals(window))
        else:
            ns = r.name if type_ == "namespace" else r.namespace
            match = side_predicate(registry, row_side, ns, type_, r.name)
            totals = Totals(window)
            for key, t in by_key.items():
                if match(key):
                    totals.merge(t)
        if (src or dst) and not totals.has_traffic and not totals.has_tcp:
            continue
        rows.append(_row(r, type_, totals, mesh))
    out.extend(rows)


def warm(aggregator: Aggregator, now: float | None = None) -> None:
    """Keep ready what `stat` is asked most, so no caller pays for building it: the default
    window's sums (kept and slid as seconds pass, never dropped for being unasked) and the
    groupings of namespace, deployment and pod rows (`_stat_grouping`'s tokens) — extended to
    new series ids, as every other grouping a query made (a `--to` peer's, a service's). The
    controller calls it each second; at 300,000 keys a first `stat deploy -A` took ~0.4 s of
    the loop, a kept one ~50 ms (docs/scale.md)."""
    wanted = dict(_row_grouping(t, "dst") for t in ("namespace", "deployment", "pod"))
    wanted[_DIRECTION_TOKEN] = _direction_of
    aggregator.keep_ready(DEFAULT_WINDOW_S, aggregator.clock() if now is None else now, wanted)


def _direction_of(key: SeriesKey) -> object:
    return key[_DIR]


_DIRECTION_TOKEN = ("direction",)   # the store's grouping of keys by `_direction_of`


def _row_grouping(type_: str, side: str) -> tuple[Hashable, Callable[[SeriesKey], object]]:
    """The store's grouping of keys by their row on `side` (its token, its function), for the
    types whose row a key names: what `_stat_grouping` asks and `warm` keeps ready."""
    row_id = _row_id_of(type_, side)
    assert row_id is not None
    return ("row", type_, side), row_id


def _stat_grouping(aggregator: Aggregator, type_: str, row_side: str, peer: tuple[str, str, str] | None,
                   direction: str, peer_side: str) -> tuple[np.ndarray, list[object], Mapping[object, int]] | None:
    """Each series id's row (-1: none) as arrays, from groupings the store keeps per key (a
    key's row id on a side, its direction): the key's row when its direction is `direction`
    and, with a peer (`--from`/`--to`), its `peer_side` is the peer — which is that side's row
    id being the peer's, for a named peer of a type whose row a key names. None: a peer the
    registry decides (a replicaset, a service as caller) or any of a type: ask per key."""
    token, row_id = _row_grouping(type_, row_side)
    rows, groups, index = aggregator.grouping(row_id, token)
    dirs, _, dir_index = aggregator.grouping(_direction_of, _DIRECTION_TOKEN)
    n = min(len(rows), len(dirs))
    keep = dirs[:n] == dir_index.get(direction, -2)
    if peer is not None:
        ns, ptype, name = peer
        peer_id = _row_id_of(ptype, peer_side)
        if peer_id is None or not name:
            return None
        at, _, at_index = aggregator.grouping(peer_id, _row_grouping(ptype, peer_side)[0])
        n = min(n, len(at))
        who = _row_id(ptype, ResourceInfo(ns, ptype, name, {}))
        keep = keep[:n] & (at[:n] == at_index.get(who, -2))
    return np.where(keep, rows[:n], -1), groups, index


def _group_by_row(type_: str, side: str, by_key: dict[SeriesKey, Totals],
                  window: int) -> dict[object, Totals] | None:
    """Totals per row id (`_row_id`) in one pass over the keys, for the types whose row a key
    names directly (what `side_predicate` matches one resource at a time: one pass per resource
    made `stat po` on 2000 pods and 10k series take 3.5 s of the controller's only loop).
    None for the types that need the registry (replicaset, a service on the calling side)."""
    row_id = _row_id_of(type_, side)
    if row_id is None:
        return None
    grouped: dict[object, Totals] = {}
    for key, t in by_key.items():
        rid = row_id(key)
        if rid is not None:
            tot = grouped.get(rid)
            if tot is None:
                tot = grouped[rid] = Totals(window)
            tot.merge(t)
    return grouped


def _row_id_of(type_: str, side: str) -> Callable[[SeriesKey], object] | None:
    """The row a key counts in (None: none), for the types whose row a key names directly;
    None for the types that need the registry (replicaset, a service on the calling side)."""
    ns_i, kind_i = LABEL_INDEX[f"{side}_namespace"], LABEL_INDEX[f"{side}_kind"]
    name_i, pod_i = LABEL_INDEX[f"{side}_name"], LABEL_INDEX[f"{side}_pod"]
    row_id: Callable[[SeriesKey], object]
    if type_ == "namespace":
        row_id = lambda k: k[ns_i] or None
    elif type_ in WORKLOAD_TYPES:
        row_id = lambda k: (k[ns_i], k[name_i]) if k[kind_i] == type_ else None
    elif type_ == "pod":
        row_id = lambda k: (k[ns_i], k[pod_i]) if k[pod_i] else None
    elif type_ == "service" and side == "dst":
        row_id = lambda k: k[_DST_SERVICE] or None
    else:
        return None
    return row_id


def _row_id(type_: str, r: ResourceInfo) -> object:
    if type_ == "namespace":
        return r.name
    if type_ == "service":
        return f"{r.name}.{r.namespace}"
    return (r.namespace, r.name)


QUANTILES = (0.5, 0.95, 0.99)


def _activity(m: np.ndarray, gauge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of summed columns, `Totals.has_traffic` (responses) and `Totals.has_tcp` (an
    open-connection gauge, connections opened, bytes read or written), as arrays."""
    traffic = m[:, COLUMN["success"]] + m[:, COLUMN["failure"]] > 0
    tcp = gauge | (m[:, COLUMN["tcp_open"]] > 0) | (m[:, COLUMN["read_bytes"]] > 0) | (m[:, COLUMN["write_bytes"]] > 0)
    return traffic, tcp


def _rows_of_sums(type_: str, resources: list[ResourceInfo], got: GroupSums,
                  count: Callable[[ResourceInfo], tuple[int, int]], only_active: bool, out: Rows) -> None:
    """The rows `_row` makes from each resource's `Totals`, computed as arrays over the grouped
    sums (one row of `got` per resource, zeros for one without any): the same numbers, by the
    same float operations (`histogram_quantiles` is `histogram_quantile` per row)."""
    index = got.index
    width = len(got.groups)
    pos = np.fromiter((index.get(_row_id(type_, r), width) for r in resources), dtype=np.int64,
                      count=len(resources))
    zero = np.zeros(1)
    m = np.vstack([got.m, np.zeros((1, NCOL))])[pos]
    gauge = np.append(got.has_gauge, False)[pos]
    open_c = np.where(gauge, np.append(got.open_connections, zero)[pos], 0.0)
    w = got.window_s
    success, failure = m[:, COLUMN["success"]], m[:, COLUMN["failure"]]
    read, write = m[:, COLUMN["read_bytes"]], m[:, COLUMN["write_bytes"]]
    responses = success + failure
    traffic, tcp = _activity(m, gauge)
    q = np.zeros((len(QUANTILES), len(resources)))
    if traffic.any():
        q[:, traffic] = np.nan_to_num(histogram_quantiles(QUANTILES, BOUNDS, m[traffic, LAT0:]), nan=0.0)
    add = out.add
    for r, s, f, rps, rb, wb, oc, has, has_tcp, p50, p95, p99 in zip(
            resources, success.tolist(), failure.tolist(), (responses / w).tolist(), (read / w).tolist(),
            (write / w).tolist(), open_c.tolist(), traffic.tolist(), tcp.tolist(), *q.tolist()):
        if only_active and not has and not has_tcp:
            continue
        meshed, running = count(r)
        row = add(meshed_pods=meshed, total_pods=running,
                  status=r.pods[0].status if type_ == "pod" and r.pods else "",
                  has_traffic=has, success_count=round(s), failure_count=round(f), rps=rps,
                  tcp_open_connections=oc, tcp_read_bytes_rate=rb, tcp_write_bytes_rate=wb, has_tcp=has_tcp,
                  latency_ms_p50=p50, latency_ms_p95=p95, latency_ms_p99=p99)
        res = row.resource   # set in place: a Resource made and copied in costs as much as the row
        res.namespace, res.type, res.name = r.namespace, type_, r.name


class _Kept:
    """What stat reads of a registry at one `version` (every change bumps it): its resources per
    (type, scope), and their pod counts for the last mesh view — 5,000 workloads over 50,000
    pods cost ~50 ms to list and count, for each query."""

    __slots__ = ("captured", "counts", "nodes", "ready", "resources", "version")

    def __init__(self, version: int) -> None:
        self.version = version
        self.resources: dict[tuple[str, str | None], list[ResourceInfo]] = {}
        self.ready: set[str] = set()
        self.captured: set[str] = set()
        self.counts: dict[int, tuple[ResourceInfo, int, int]] = {}   # id(resource) -> it, its counts
        self.nodes: dict[tuple[str, str], str] | None = None          # (namespace, pod) -> node


_KEPT: weakref.WeakKeyDictionary[WorkloadRegistry, _Kept] = weakref.WeakKeyDictionary()


def _kept(registry: WorkloadRegistry) -> _Kept:
    kept = _KEPT.get(registry)
    if kept is None or kept.version != registry.version:
        kept = _KEPT[registry] = _Kept(registry.version)
    return kept


def _resources(registry: WorkloadRegistry, type_: str, scope: str | None) -> list[ResourceInfo]:
    """`registry.resources`, kept while the registry is unchanged (the list is shared: read only)."""
    kept = _kept(registry)
    got = kept.resources.get((type_, scope))
    if got is None:
        got = kept.resources[(type_, scope)] = registry.resources(type_, scope)
    return got


def _counter(registry: WorkloadRegistry, mesh: MeshView) -> Callable[[ResourceInfo], tuple[int, int]]:
    """`_pod_counts` for the mesh view, kept per resource while neither the registry nor the mesh
    view changes (each kept with its resource: an id is never another's)."""
    kept = _kept(registry)
    if kept.ready != mesh.ready_nodes or kept.captured != mesh.captured_namespaces:
        kept.ready, kept.captured, kept.counts = set(mesh.ready_nodes), set(mesh.captured_namespaces), {}
    counts = kept.counts

    def count(r: ResourceInfo) -> tuple[int, int]:
        got = counts.get(id(r))
        if got is None or got[0] is not r:
            got = counts[id(r)] = (r, *_pod_counts(r, mesh))
        return got[1], got[2]
    return count


def _pod_counts(r: ResourceInfo, mesh: MeshView) -> tuple[int, int]:
    """The resource's running pods that are meshed, and all its running pods."""
    running = [p for p in r.pods if p.running]
    meshed = [p for p in running if p.node in mesh.ready_nodes and p.namespace in mesh.captured_namespaces
              and not p.host_network]
    return len(meshed), len(running)


def _and(a: Predicate, b: Predicate) -> Predicate:
    return lambda k: a(k) and b(k)


def _row(r: ResourceInfo, type_: str, totals: Totals, mesh: MeshView) -> pb.StatRow:
    meshed, running = _pod_counts(r, mesh)
    row = pb.StatRow(
        resource=pb.Resource(namespace=r.namespace, type=type_, name=r.name),
        meshed_pods=meshed, total_pods=running,
        status=r.pods[0].status if type_ == "pod" and r.pods else "",
        has_traffic=totals.has_traffic,
        success_count=round(totals.success), failure_count=round(totals.failure),
        rps=totals.rps,
        tcp_open_connections=totals.open_connections,
        tcp_read_bytes_rate=totals.read_bytes_rate, tcp_write_bytes_rate=totals.write_bytes_rate,
        has_tcp=totals.has_tcp,
    )
    if totals.has_traffic:
        row.latency_ms_p50 = totals.quantile(0.5) or 0.0
        row.latency_ms_p95 = totals.quantile(0.95) or 0.0
        row.latency_ms_p99 = totals.quantile(0.99) or 0.0
    return row


# ------------------------------------------------------------------ Edges
def edges(registry: WorkloadRegistry, aggregator: SeriesStore, req: pb.EdgesRequest,
          now: float | None = None) -> pb.EdgesResponse:
    try:
        return pb.EdgesResponse(edges=_edges(registry, aggregator, req, now))
    except StatError as exc:
        return pb.EdgesResponse(error=str(exc))


def _edges(registry: WorkloadRegistry, aggregator: SeriesStore, req: pb.EdgesRequest,
           now: float | None) -> list[pb.Edge]:
    type_ = _selector_type(req.selector, EDGE_TYPES, "edges")
    window = check_window(int(req.window_seconds))
    namespace = req.selector.namespace or "default"
    if not req.all_namespaces and type_ != "namespace":
        _check_namespace(registry, namespace)
    seen: dict[tuple[tuple[str, str, str], tuple[str, str, str]], _EdgeTls] = {}
    for key in _active_keys(aggregator, window, now):
        pair = (_end(registry, key, "src", type_), _end(registry, key, "dst", type_))
        if pair[0] is None or pair[1] is None:
            continue  # an unknown/external peer: edges are between resources we can name
        if type_ in WORKLOAD_TYPES and type_ not in (pair[0][1], pair[1][1]):
            continue
        if not req.all_namespaces:
            # An edge belongs to a namespace when either end lives there.
            at = 2 if type_ == "namespace" else 0  # a namespace's name, else a resource's namespace
            if namespace not in (pair[0][at], pair[1][at]):
                continue
        if req.selector.name and req.selector.name not in (pair[0][2], pair[1][2]):
            continue
        edge = seen.get(pair)  # type: ignore[arg-type]
        if edge is None:
            edge = seen[pair] = _EdgeTls()  # type: ignore[index]
        edge.add(registry, key)
    return [seen[(s, d)].edge(pb.Resource(namespace=s[0], type=s[1], name=s[2]),
                              pb.Resource(namespace=d[0], type=d[1], name=d[2]))
            for s, d in sorted(seen)]


_TLS, _CLIENT_ID, _SERVER_ID = LABEL_INDEX["tls"], LABEL_INDEX["client_id"], LABEL_INDEX["server_id"]
# What of a key an edge's end (`_end`) and its mTLS (`_EdgeTls.add`) read: keys alike in these are
# one edge's, each adding the same.
_EDGE_LABELS = tuple(LABEL_INDEX[name] for name in (
    "src_namespace", "src_kind", "src_name", "src_pod", "dst_namespace", "dst_kind", "dst_name", "dst_pod",
    "tls", "client_id", "server_id"))


def _active_keys(aggregator: SeriesStore, window: int, now: float | None) -> list[SeriesKey]:
    """The keys with traffic or TCP in the window — from the in-memory store, one per set of keys
    alike in what edges read (`_EDGE_LABELS`; the others hold ""), summed by numpy: no Totals
    per key (a group has traffic or TCP when one of its keys has: the sums are of non-negative
    counts)."""
    if not isinstance(aggregator, Aggregator):
        return [key for key, t in aggregator.totals_by_key(window, now).items() if t.has_traffic or t.has_tcp]
    got = aggregator.group_sums(window, now, _edge_key, ("edges",))
    traffic, tcp = _activity(got.m, got.has_gauge)
    active = got.present & (traffic | tcp)
    groups = got.groups
    return [groups[j] for j in np.flatnonzero(active).tolist()]  # type: ignore[misc]


_BLANK = tuple(i not in _EDGE_LABELS for i in range(len(PEER_LABELS)))


def _edge_key(key: SeriesKey) -> SeriesKey:
    """The key with "" for what edges do not read (a group's name: made once per series id)."""
    return tuple("" if blank else v for v, blank in zip(key, _BLANK))


class _EdgeTls:
    """What an edge's series say about mTLS (Linkerd's `edges`): the identities verified — the
    client's by the callee's agent (inbound series' client_id), the server's by the caller's
    (outbound series' server_id) — and whether any of its traffic crossed nodes in plaintext.
    Same-node traffic never leaves the agent (no tunnel, nothing on the network)."""

    __slots__ = ("client_ids", "plaintext", "same_node", "server_ids")

    def __init__(self) -> None:
        self.client_ids: set[str] = set()
        self.server_ids: set[str] = set()
        self.plaintext = False   # a series that crossed nodes (or may have) outside a tunnel
        self.same_node = False

    def add(self, registry: WorkloadRegistry, key: SeriesKey) -> None:
        if key[_TLS] == "true":
            if key[_CLIENT_ID]:
                self.client_ids.add(key[_CLIENT_ID])
            if key[_SERVER_ID]:
                self.server_ids.add(key[_SERVER_ID])
        elif _same_node(registry, key):
            self.same_node = True
        else:
            self.plaintext = True

    def edge(self, src: pb.Resource, dst: pb.Resource) -> pb.Edge:
        secured = bool(self.client_ids or self.server_ids) and not self.plaintext
        if secured:
            msg = ""
        elif self.client_ids or self.server_ids:
            msg = "partly plaintext: some connections crossed nodes outside mTLS"
        elif self.plaintext:
            msg = "not mTLS: crossed nodes in plaintext (mTLS off, no certificate yet, or fail-open)"
        else:
            msg = "same node: never left the node's agent"
        return pb.Edge(src=src, dst=dst, client_id=",".join(sorted(self.client_ids)),
                       server_id=",".join(sorted(self.server_ids)), no_identity_msg=msg, secured=secured)


# A side's (namespace, kind, name, pod) label positions.
_SIDE = {side: tuple(LABEL_INDEX[f"{side}_{label}"] for label in ("namespace", "kind", "name", "pod"))
         for side in ("src", "dst")}


def _same_node(registry: WorkloadRegistry, key: SeriesKey) -> bool:
    """Both ends are pods the registry places on one node (so the agent relayed it locally)."""
    node_of = _nodes(registry)
    (sns, _, _, spod), (dns, _, _, dpod) = _SIDE["src"], _SIDE["dst"]
    src = node_of.get((key[sns], key[spod])) if key[spod] else None
    return bool(src) and src == (node_of.get((key[dns], key[dpod])) if key[dpod] else None)


def _nodes(registry: WorkloadRegistry) -> dict[tuple[str, str], str]:
    """Each pod's node by (namespace, name), kept while the registry is unchanged."""
    kept = _kept(registry)
    if kept.nodes is None:
        kept.nodes = {(p.namespace, p.name): p.node for p in registry.pods()}
    return kept.nodes


def _end(registry: WorkloadRegistry, key: SeriesKey, side: str, type_: str) -> tuple[str, str, str] | None:
    ns_i, kind_i, name_i, pod_i = _SIDE[side]
    ns = key[ns_i]
    kind = key[kind_i]
    if not ns or kind in ("", "unknown"):
        return None
    if type_ == "namespace":
        return ("", "namespace", ns)
    if type_ == "pod":
        pod = key[pod_i]
        return (ns, "pod", pod) if pod else None
    if type_ == "replicaset":
        rec = registry.pod(ns, key[pod_i])
        return (ns, "replicaset", rec.replicaset) if rec and rec.replicaset else None
    return (ns, kind, key[name_i])


def describe(type_: str, name: str) -> str:
    return f"{SHORT_TYPE.get(type_, type_)}/{name}"

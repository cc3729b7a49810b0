"""Per-route numbers: the route series agents report, aggregated, and `nodemesh routes` answered.

Route series (`route_request_total`, `route_response_total{classification}`,
`route_response_latency_ms`; labels `ROUTE_LABELS`) are kept in their own `Aggregator`, keyed by
the route label tuple, so route cardinality never touches the peer series `stat` reads. Each agent
caps routes per destination workload; agents on several nodes could learn different ones, so the
controller caps again (`RouteCap`: the same count per destination workload, `[other]` beyond).

Which observations make the rows, as Linkerd's `viz routes`:

* `routes deploy/voting`: its INBOUND view — requests observed with direction=inbound whose
  destination is the workload (what its callers got, measured at its side);
* `routes svc/voting-svc`: its callers' OUTBOUND view of the Service (services are seen only by
  their clients);
* `routes deploy/web --to deploy/voting`: web's OUTBOUND view of its calls to voting.

One row per (service, route) with requests in the window, sorted by service then route, with
`[DEFAULT]` (requests with no path to name) and `[other]` (past the cap) last, and a `[DEFAULT]`
row for every service shown even without traffic, as Linkerd prints it.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    DEFAULT_ROUTE,
    OTHER_LABEL_VALUE,
    ROUTE_LABELS,
    UNKNOWN_KIND,
    is_automatic_route,
)
from nodemesh.controlplane.aggregate import SeriesKey, SeriesStore, Totals
from nodemesh.controlplane.registry import WorkloadRegistry
from nodemesh.controlplane.stat import (
    WORKLOAD_TYPES,
    StatError,
    canonical_type,
    check_window,
)

ROUTE_INDEX = {name: i for i, name in enumerate(ROUTE_LABELS)}
_DIR, _ROUTE, _SVC = ROUTE_INDEX["direction"], ROUTE_INDEX["rt_route"], ROUTE_INDEX["dst_service"]
_DST = slice(ROUTE_INDEX["dst_namespace"], ROUTE_INDEX["dst_name"] + 1)
ROUTE_TYPES = frozenset((*WORKLOAD_TYPES, "service"))
_LAST = {DEFAULT_ROUTE: 1, OTHER_LABEL_VALUE: 2}  # after the named routes, in this order


def route_key(labels: dict[str, str]) -> SeriesKey:
    get = labels.get
    return tuple(get(name, "") for name in ROUTE_LABELS)


class RouteCap:
    """At most `max_routes` routes per destination workload across all agents; the places of
    routes gone from the aggregator (pruned after the retention) are given back by `prune`."""

    def __init__(self, max_routes: int = 100) -> None:
        self.max_routes = max_routes
        self._seen: dict[SeriesKey, set[str]] = {}
        self.overflowed = 0.0

    def cap(self, key: SeriesKey, value: float = 0.0) -> SeriesKey:
        route = key[_ROUTE]
        if not is_automatic_route(route):  # [DEFAULT], [other], configured names take no place
            return key
        seen = self._seen.setdefault(key[_DST], set())
        if route in seen:
            return key
        if len(seen) < self.max_routes:
            seen.add(route)
            return key
        self.overflowed += value
        return (*key[:_ROUTE], OTHER_LABEL_VALUE, *key[_ROUTE + 1:])

    def prune(self, keys: object) -> None:
        live: dict[SeriesKey, set[str]] = {}
        for key in keys:  # type: ignore[attr-defined]
            if is_automatic_route(key[_ROUTE]):
                live.setdefault(key[_DST], set()).add(key[_ROUTE])
        self._seen = live


def route_summary(registry: WorkloadRegistry, aggregator: SeriesStore, req: pb.RoutesRequest,
                  now: float | None = None) -> pb.RoutesResponse:
    try:
        return pb.RoutesResponse(rows=_rows(registry, aggregator, req, now))
    except StatError as exc:
        return pb.RoutesResponse(error=str(exc))


Predicate = Callable[[SeriesKey], bool]


def _target(registry: WorkloadRegistry, res: pb.Resource, default_ns: str, what: str) -> tuple[str, str, str]:
    """(namespace, canonical type, name) of a resource that must exist."""
    if not res.type:
        raise StatError(f"no resource type given{what}")
    type_ = canonical_type(res.type)
    if type_ not in ROUTE_TYPES:
        raise StatError(f"routes are kept per workload and service: resource type {type_!r}{what} is not "
                        "supported (deploy, sts, ds, job, svc)")
    if not res.name:
        raise StatError(f"routes need one resource by name{what}, e.g. deploy/web")
    namespace = res.namespace or default_ns
    if namespace != "default" and namespace not in registry.namespaces():
        raise StatError(f'namespace "{namespace}" not found')
    if registry.resource(type_, namespace, res.name) is None:
        raise StatError(f'{type_} "{res.name}" not found in namespace "{namespace}"')
    return namespace, type_, res.name


def _side(side: str, namespace: str, type_: str, name: str) -> Predicate:
    ns_i, kind_i, name_i = (ROUTE_INDEX[f"{side}_{f}"] for f in ("namespace", "kind", "name"))
    if type_ == "service":
        if side == "src":
            raise StatError("a service calls nothing: use a workload with --to")
        full = f"{name}.{namespace}"
        return lambda k: k[_SVC] == full
    return lambda k: k[ns_i] == namespace and k[kind_i] == type_ and k[name_i] == name


def _rows(registry: WorkloadRegistry, aggregator: SeriesStore, req: pb.RoutesRequest,
          now: float | None) -> list[pb.RouteRow]:
    window = check_window(int(req.window_seconds))
    default_ns = req.selector.namespace or "default"
    target = _target(registry, req.selector, default_ns, "")
    if req.to.type:
        to = _target(registry, req.to, default_ns, " for --to")
        src, dst = _side("src", *target), _side("dst", *to)
        where: Predicate = lambda k: k[_DIR] == "outbound" and src(k) and dst(k)
    elif target[1] == "service":
        dst = _side("dst", *target)
        where = lambda k: k[_DIR] == "outbound" and dst(k)
    else:
        dst = _side("dst", *target)
        where = lambda k: k[_DIR] == "inbound" and dst(k)

    names = _service_names(registry)
    grouped: dict[tuple[str, str], tuple[Totals, SeriesKey]] = {}
    for key, totals in aggregator.totals_by_key(window, now, where).items():
        if not totals.requests and not totals.responses:
            continue
        row_id = (_service(key, names), key[_ROUTE])
        have = grouped.get(row_id)
        if have is None:
            grouped[row_id] = (totals.copy(), key)  # merged into below: not the aggregator's own
        else:
            have[0].merge(totals)
    for service in {s for s, _ in grouped}:
        if (service, DEFAULT_ROUTE) not in grouped:
            any_key = next(k for (s, _), (_, k) in grouped.items() if s == service)
            grouped[(service, DEFAULT_ROUTE)] = (Totals(window), any_key)
    rows = []
    for (service, route), (totals, key) in sorted(grouped.items(), key=lambda item: _order(*item[0])):
        row = pb.RouteRow(
            route=route, service=service,
            destination=pb.Resource(namespace=key[ROUTE_INDEX["dst_namespace"]],
                                    type=key[ROUTE_INDEX["dst_kind"]], name=key[ROUTE_INDEX["dst_name"]]),
            has_traffic=totals.has_traffic, success_count=round(totals.success),
            failure_count=round(totals.failure), rps=totals.rps, request_count=round(totals.requests),
        )
        if totals.has_traffic:
            row.latency_ms_p50 = totals.quantile(0.5) or 0.0
            row.latency_ms_p95 = totals.quantile(0.95) or 0.0
            row.latency_ms_p99 = totals.quantile(0.99) or 0.0
        rows.append(row)
    return rows


def _order(service: str, route: str) -> tuple[str, int, str]:
    return (service, _LAST.get(route, 0), route)


def _service_names(registry: WorkloadRegistry) -> dict[tuple[str, str, str], str]:
    """Destination workload -> the Service that selects its pods (the first by name), so inbound
    rows (the callee's agent does not know which Service its caller dialled) name it too."""
    out: dict[tuple[str, str, str], str] = {}
    for svc in sorted(registry.services(), key=lambda s: (s.namespace, s.name)):
        for pod in registry.service_pods(svc):
            ref = pod.workload
            out.setdefault((ref.namespace, ref.kind, ref.name), svc.name)
    return out


def _service(key: SeriesKey, names: dict[tuple[str, str, str], str]) -> str:
    dialled = key[_SVC]
    if dialled:
        return dialled.rpartition(".")[0] or dialled
    dst = key[_DST]
    if dst[1] == UNKNOWN_KIND or not dst[0]:
        return "-"
    return names.get(dst, dst[2])  # type: ignore[arg-type]

"""What the dashboard's JSON API answers, computed through the controller's own Python API.

Stat rows come from `Controller.stat` and edges from `Controller.edges` — the very calls the gRPC
StatSummary/Edges methods make — over the store the controller answers from by default
(`--stat-backend`: its memory, or a Prometheus snapshot the route fetched), so a row here equals
`nodemesh stat -o json` for the same window. Time series come from the same backend: the in-memory
aggregator's one-second buckets summed per step, or one Prometheus snapshot per step (range
queries); either way the controller's own `Totals` math (success rate, rate, histogram quantiles).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import KIND_OF_TYPE, SHORT_TYPE
from nodemesh.api.rows import json_number, route_row_json, stat_row_json
from nodemesh.controlplane.aggregate import LABEL_INDEX, Aggregator, SeriesKey, SeriesStore, Totals
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.dashboard.params import ApiError
from nodemesh.controlplane.routes import ROUTE_TYPES
from nodemesh.controlplane.stat import side_predicate

# manifests/grafana/nodemesh-workload.json: its uid and template variables (a unit test pins them).
GRAFANA_WORKLOAD_UID = "nodemesh-workload"
GRAFANA_WORKLOAD_VARS = ("namespace", "kind", "workload")
SERIES_RANGE_S = 3600
_DIR = LABEL_INDEX["direction"]


# ---------------------------------------------------------------------------- stat rows



def _error_status(message: str) -> int:
    return 404 if "not found" in message else 400


def stat_rows(controller: Controller, requests: Sequence[pb.StatRequest],
              now: float | None = None, store: SeriesStore | None = None) -> list[pb.StatRow]:
    """One StatSummary per request (as the CLI sends one per resource type), rows merged and
    ordered as `stat -o json` orders them: by type, then namespace, then name."""
    rows: list[pb.StatRow] = []
    for req in requests:
        resp = controller.stat(req, now, store)
        if resp.error:
            raise ApiError(resp.error, _error_status(resp.error))
        rows.extend(resp.rows)
    rows.sort(key=lambda r: (r.resource.type, r.resource.namespace, r.resource.name))
    return list(rows)


def namespaces(controller: Controller) -> list[dict[str, object]]:
    captured = set(controller.captured_namespaces())
    return [{"name": ns, "captured": ns in captured} for ns in sorted(controller.registry.namespaces())]


# ---------------------------------------------------------------------------- workload page
def _resource_json(res: pb.Resource) -> dict[str, str]:
    return {"namespace": res.namespace, "type": res.type, "kind": KIND_OF_TYPE.get(res.type, res.type).lower(),
            "short": SHORT_TYPE.get(res.type, res.type), "name": res.name}


def _peer_rows(controller: Controller, me: pb.Resource, window_s: int, now: float | None,
               store: SeriesStore | None) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Callers and callees of `me`: the peers `edges` names, each with the stat row of that edge
    (`stat TYPE/PEER --to ME` for a caller, `stat TYPE/PEER --from ME` for a callee)."""
    resp = controller.edges(pb.EdgesRequest(selector=pb.Resource(type="all"), all_namespaces=True,
                                            window_seconds=window_s), now, store)
    if resp.error:
        raise ApiError(resp.error, _error_status(resp.error))
    mine = (me.namespace, me.type, me.name)
    callers: list[dict[str, Any]] = []
    callees: list[dict[str, Any]] = []
    for edge in resp.edges:
        src = (edge.src.namespace, edge.src.type, edge.src.name)
        dst = (edge.dst.namespace, edge.dst.type, edge.dst.name)
        for peer, side, out in ((edge.src, "to", callers), (edge.dst, "from", callees)):
            if (dst if side == "to" else src) != mine:
                continue
            req = pb.StatRequest(selector=pb.Resource(namespace=peer.namespace, type=peer.type, name=peer.name),
                                 window_seconds=window_s)
            getattr(req, side).CopyFrom(me)
            got = controller.stat(req, now, store)
            if got.error or not got.rows:
                continue  # the peer left the registry, or only TCP without a row: nothing to show
            out.append({"peer": _resource_json(peer), "stat": stat_row_json(got.rows[0]),
                        "tls": {"secured": edge.secured, "client_id": edge.client_id,
                                "server_id": edge.server_id, "msg": edge.no_identity_msg}})
    key = lambda e: (e["peer"]["namespace"], e["peer"]["name"])
    return sorted(callers, key=key), sorted(callees, key=key)


def _pods(controller: Controller, me: pb.Resource) -> list[dict[str, object]]:
    info = controller.registry.resource(me.type, me.namespace, me.name)
    if info is None:
        return []
    mesh = controller.mesh_view()
    return [{
        "name": p.name, "namespace": p.namespace, "node": p.node, "ip": p.ip, "status": p.status,
        "ready": p.ready,
        "meshed": p.running and p.node in mesh.ready_nodes and p.namespace in mesh.captured_namespaces
        and not p.host_network,
    } for p in sorted(info.pods, key=lambda p: p.name)]


def row_predicate(controller: Controller, me: pb.Resource) -> Callable[[SeriesKey], bool]:
    """The series a resource's own stat row sums (stat.py: inbound, or outbound to a service)."""
    direction = "outbound" if me.type == "service" else "inbound"
    match = side_predicate(controller.registry, "dst", me.namespace, me.type, me.name)
    return lambda k: k[_DIR] == direction and match(k)


def series_matchers(me: pb.Resource) -> dict[str, str]:
    """Label equalities every series of `me`'s row has (`row_predicate` decides exactly): what a
    Prometheus range query can narrow to before the controller filters."""
    if me.type == "service":
        return {"direction": "outbound", "dst_service": f"{me.name}.{me.namespace}"}
    return {"direction": "inbound", "dst_namespace": me.namespace}


def _one_second(sec: int) -> int:
    return 1


def time_series(controller: Controller, me: pb.Resource, step_s: int, range_s: int = SERIES_RANGE_S,
                now: float | None = None,
                steps: Sequence[tuple[int, SeriesStore]] | None = None) -> dict[str, object]:
    """Success rate, RPS and latency quantiles per `step_s` over the last `range_s` seconds,
    oldest first; a step without responses has nulls (a gap, not a zero). `steps`: one store per
    step (the controller's `steps_for`, Prometheus); None: the in-memory blocks — where they are
    downsampled to blocks longer than a step, each step they cover shows the block's rate."""
    now = time.time() if now is None else now
    where = row_predicate(controller, me)
    keys: set[SeriesKey] = set()
    memory = steps is None   # the keys' entries of each step's blocks, summed by numpy (no Totals per key)
    width = _one_second   # Prometheus: a store per step
    spans: dict[int, Totals] = {}   # downsampled blocks' totals by their first second
    if steps is None:
        width = controller.aggregator.block_width
        keys = {k for k in controller.aggregator.keys() if where(k)}  # noqa: SIM118 - not a dict
        where = keys.__contains__
        store: SeriesStore = controller.aggregator if keys else _EMPTY
        end = int(now)
        steps = [(end - i * step_s, store) for i in range(range_s // step_s - 1, -1, -1)]
    points = []
    for step_end, store in steps:
        span = width(step_end - step_s)
        if span > step_s:
            # Downsampled history: a block of `span` seconds is spread over the steps it covers
            # (its rate in each), not one step holding it all and gaps around.
            start = (step_end - step_s) - (step_end - step_s) % span
            got = spans.get(start)
            if got is None:
                got = spans[start] = _summed(store, span, start + span, keys if memory else None, where)
            tot = got
        else:
            tot = _summed(store, step_s, step_end, keys if memory else None, where)
        has = tot.has_traffic
        points.append({
            "t": step_end,
            "success": json_number(tot.success_rate) if has and tot.success_rate is not None else None,
            "rps": json_number(tot.rps) if has else None,
            "p50": json_number(tot.quantile(0.5) or 0.0) if has else None,
            "p95": json_number(tot.quantile(0.95) or 0.0) if has else None,
            "p99": json_number(tot.quantile(0.99) or 0.0) if has else None,
        })
    return {"step_s": step_s, "range_s": range_s, "points": points}


def _summed(store: SeriesStore, window_s: int, end: int, keys: set[SeriesKey] | None,
            where: Callable[[SeriesKey], bool]) -> Totals:
    """The window's totals of the keys `where` takes: from the in-memory store by the keys'
    entries (`keys`: them), else merged from a Totals per key."""
    if keys is not None and isinstance(store, Aggregator):
        return store.totals_of(window_s, end, keys)
    tot = Totals(window_s)
    for t in store.totals_by_key(window_s, end, where).values():
        tot.merge(t)
    return tot


class _Empty:
    """A store with nothing in it (a resource without series: no bucket walk per step)."""

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        return {}

    def keys(self) -> Iterable[SeriesKey]:
        return ()


_EMPTY = _Empty()


def grafana_workload_url(base: str, me: pb.Resource) -> str | None:
    if not base:
        return None
    query = urlencode({"var-namespace": me.namespace, "var-kind": me.type, "var-workload": me.name})
    return f"{base.rstrip('/')}/d/{GRAFANA_WORKLOAD_UID}/{GRAFANA_WORKLOAD_UID}?{query}"


def routes(controller: Controller, me: pb.Resource, window_s: int, now: float | None = None,
           store: SeriesStore | None = None) -> list[dict[str, Any]]:
    """`nodemesh routes TYPE/NAME -o json` for the page: the routes `me` serves (its inbound view;
    a Service's: what its callers sent it). Pods have none of their own (route series are per
    workload): an empty list, not an error."""
    if me.type not in ROUTE_TYPES:
        return []
    resp = controller.routes(pb.RoutesRequest(selector=me, window_seconds=window_s), now, store)
    if resp.error:
        raise ApiError(resp.error, _error_status(resp.error))
    return [route_row_json(r) for r in resp.rows]


def workload(controller: Controller, me: pb.Resource, window_s: int, step_s: int, grafana_base: str,
             now: float | None = None, peer_store: SeriesStore | None = None,
             route_store: SeriesStore | None = None,
             steps: Sequence[tuple[int, SeriesStore]] | None = None) -> dict[str, object]:
    """The workload page. `peer_store`/`route_store`/`steps`: the snapshots the controller's
    backend gave (None: its memory), fetched for `now`."""
    (row,) = stat_rows(controller, [pb.StatRequest(selector=me, window_seconds=window_s)], now, peer_store)
    callers, callees = _peer_rows(controller, me, window_s, now, peer_store)
    return {
        "resource": _resource_json(me),
        "window_s": window_s,
        "stat": stat_row_json(row),
        "callers": callers,
        "callees": callees,
        "routes": routes(controller, me, window_s, now, route_store),
        "pods": _pods(controller, me),
        "series": time_series(controller, me, step_s, now=now, steps=steps),
        "warning": controller.store_warning(peer_store),
        "grafana_url": grafana_workload_url(grafana_base, me),
    }


# ---------------------------------------------------------------------------- tap
def _peer_json(peer: pb.Peer) -> dict[str, object]:
    owner = f"{SHORT_TYPE.get(peer.owner.type, peer.owner.type)}/{peer.owner.name}" if peer.owner.name else ""
    return {"ip": peer.ip, "port": peer.port, "namespace": peer.namespace, "pod": peer.pod, "owner": owner}


def tap_event_json(event: pb.TapEvent) -> dict[str, Any]:
    """A flat event for the page: `id` is unique across agents (request ids are per agent)."""
    out: dict[str, Any] = {
        "id": f"{event.node}/{event.request_id}", "direction": event.direction, "node": event.node,
        "time_ms": event.time_ms, "source": _peer_json(event.source),
        "destination": _peer_json(event.destination), "event": event.WhichOneof("event") or "",
    }
    if event.HasField("request_init"):
        req = event.request_init
        out.update(method=req.method, scheme=req.scheme, authority=req.authority, path=req.path)
    elif event.HasField("response_init"):
        rsp = event.response_init
        out.update(http_status=rsp.http_status, latency_us=rsp.since_request_init_us)
    elif event.HasField("response_end"):
        end = event.response_end
        out.update(grpc_status=end.grpc_status if end.has_grpc_status else None, reset_error=end.reset_error,
                   duration_us=end.since_request_init_us, response_bytes=end.response_bytes)
    return out

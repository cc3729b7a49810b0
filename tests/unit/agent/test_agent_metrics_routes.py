"""Route series (route_request_total, route_response_total, route_response_latency_ms): counted
next to the peer series with the same classification and latency, capped per destination workload
in the worker and again in the node's store, and left out entirely when route metrics are off."""

from __future__ import annotations

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import NodeStore, from_series, to_series
from nodemesh.agent.metrics_export import SnapshotCollector
from nodemesh.agent.observe import ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    LABEL_OVERFLOW,
    OTHER_LABEL_VALUE,
    PEER_LABELS,
    REQUEST_TOTAL,
    RESPONSE_LATENCY_MS,
    ROUTE_LABELS,
    ROUTE_REQUEST_TOTAL,
    ROUTE_RESPONSE_LATENCY_MS,
    ROUTE_RESPONSE_TOTAL,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

WEB, VOTING, EXTERNAL = "10.244.1.5", "10.244.1.7", "192.0.2.9"   # both pods on node-1
VOTING_SVC = "10.96.0.30"


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot(resource_version="1")
    for ip, name in ((WEB, "web"), (VOTING, "voting")):
        snap.pods.append(pb.Pod(ip=ip, namespace="emojivoto", name=f"{name}-abc", node="node-1",
                                owner=pb.Resource(namespace="emojivoto", type="deployment", name=name),
                                ready=True))
    snap.services.append(pb.Service(namespace="emojivoto", name="voting-svc", cluster_ip=VOTING_SVC,
                                    ports=[pb.ServicePort(name="grpc", port=8080, target_port=8080)],
                                    endpoints=[pb.Endpoint(ip=VOTING, ready=True)]))
    return snap


def telemetry(**kw: object) -> WorkerTelemetry:
    t = WorkerTelemetry(AgentConfig(node="node-1", workers=1, **kw))  # type: ignore[arg-type]
    t.index.update(identity())
    return t


def call(t: WorkerTelemetry, c: object, method: str, path: str, *, grpc: bool, status: int = 200,
         grpc_status: int | None = None, latency_s: float = 0.004) -> None:
    r = t.request_start(c, RequestHead(method, "http", "voting-svc:8080", path, grpc=grpc, started=200.0))
    t.response_start(r, status, [], 200.0 + latency_s)
    t.request_end(r, RequestEnd(grpc_status=grpc_status, ended=201.0))


def route_counts(t: WorkerTelemetry) -> dict[tuple[str, str, str], int]:
    """{(direction, rt_route, classification): count}"""
    out: dict[tuple[str, str, str], int] = {}
    for key, n in t.metrics.route_response_total.items():
        d = dict(zip((*ROUTE_LABELS, "classification"), key))
        k = (d["direction"], d["rt_route"], d["classification"])
        out[k] = out.get(k, 0) + n
    return out


def test_routes_counted_per_method_with_stat_semantics_in_both_directions() -> None:
    t = telemetry()
    c = t.connection_open(ConnectionMeta(1, "outbound", (WEB, 40000), (VOTING_SVC, 8080), (VOTING, 8080),
                                         "http2", started=100.0))
    for _ in range(3):
        call(t, c, "POST", "/emojivoto.v1.VotingService/VoteJoy", grpc=True, grpc_status=0, latency_s=0.002)
    for _ in range(2):
        call(t, c, "POST", "/emojivoto.v1.VotingService/VoteDoughnut", grpc=True, grpc_status=2, latency_s=0.03)
    joy, dough = "/emojivoto.v1.VotingService/VoteJoy", "/emojivoto.v1.VotingService/VoteDoughnut"
    # same node: one observation, counted outbound and inbound (the stat rule)
    assert route_counts(t) == {
        ("outbound", joy, "success"): 3, ("inbound", joy, "success"): 3,
        ("outbound", dough, "failure"): 2, ("inbound", dough, "failure"): 2,
    }
    labels = [dict(zip(ROUTE_LABELS, k)) for k in t.metrics.route_request_total]
    assert {(d["src_name"], d["dst_name"], d["dst_service"]) for d in labels} == \
        {("web", "voting", "voting-svc.emojivoto")}
    # route totals equal the peer totals: nothing counted twice, nothing lost
    assert sum(t.metrics.route_request_total.values()) == sum(t.metrics.request_total.values()) == 10
    # latency: each route's histogram holds its own requests
    bounds_sum = {dict(zip(ROUTE_LABELS, k))["rt_route"]: v[-1] for k, v in t.metrics.route_latency.items()
                  if k[0] == "outbound"}
    assert round(bounds_sum[joy]) == 6 and round(bounds_sum[dough]) == 60
    assert sum(v[-1] for v in t.metrics.route_latency.values()) == \
        sum(v[-1] for v in t.metrics.response_latency.values())


def test_routes_http_ids_template_and_the_worker_cap_holds() -> None:
    t = telemetry(max_routes=5)
    c = t.connection_open(ConnectionMeta(1, "inbound", (EXTERNAL, 40000), (VOTING, 8080), (VOTING, 8080),
                                         "http1", started=100.0))
    for i in range(1000):
        call(t, c, "GET", f"/api/users/{i}?x={i}", grpc=False, status=500 if i % 10 == 0 else 200)
    for i in range(20):
        call(t, c, "GET", f"/page{i}", grpc=False)
    counts = route_counts(t)
    assert counts[("inbound", "GET /api/users/{id}", "success")] == 900
    assert counts[("inbound", "GET /api/users/{id}", "failure")] == 100
    routes = {k[1] for k in counts}
    assert len(routes - {OTHER_LABEL_VALUE}) == 5 and OTHER_LABEL_VALUE in routes
    assert sum(counts.values()) == 1020
    # an unknown caller's name is not its IP in route series
    assert {dict(zip(ROUTE_LABELS, k))["src_name"] for k in t.metrics.route_request_total} == {""}
    assert {dict(zip(PEER_LABELS, k))["src_name"] for k in t.metrics.request_total} == {EXTERNAL}


def test_routes_off_counts_no_route_series_and_peer_series_are_unchanged() -> None:
    on, off = telemetry(), telemetry(route_metrics=False)
    for t in (on, off):
        c = t.connection_open(ConnectionMeta(1, "outbound", (WEB, 40000), (VOTING, 8080), (VOTING, 8080),
                                             "http1", started=100.0))
        call(t, c, "GET", "/a/1", grpc=False)
    assert not off.metrics.route_request_total and not off.metrics.route_response_total
    assert on.metrics.route_request_total
    for name in ("request_total", "response_total", "response_latency", "tcp_open_total"):
        assert getattr(on.metrics, name) == getattr(off.metrics, name)


def route_key(dst: str, route: str) -> tuple[str, ...]:
    return ("inbound", "emojivoto", "deployment", "web", "emojivoto", "deployment", dst, "", route)


def test_node_store_caps_routes_per_destination_workload_and_frees_places_on_eviction() -> None:
    now = [0.0]
    store = NodeStore(max_routes=3, idle_s=10, clock=lambda: now[0])
    delta = {ROUTE_REQUEST_TOTAL: {route_key("voting", f"GET /r{i}"): 2 for i in range(5)}}
    delta[ROUTE_REQUEST_TOTAL][route_key("emoji", "GET /r9")] = 1   # another workload: its own cap
    delta[ROUTE_REQUEST_TOTAL][route_key("voting", "[DEFAULT]")] = 1  # takes no place
    store.add(delta)
    voting = {k[-1]: v for k, v in store.series[ROUTE_REQUEST_TOTAL].items() if k[6] == "voting"}
    assert voting == {"GET /r0": 2, "GET /r1": 2, "GET /r2": 2, OTHER_LABEL_VALUE: 4, "[DEFAULT]": 1}
    assert store.series[LABEL_OVERFLOW][("rt_route",)] == 4
    assert route_key("emoji", "GET /r9") in store.series[ROUTE_REQUEST_TOTAL]
    # a configured route's name takes no place under the cap and is never folded
    store.add({ROUTE_REQUEST_TOTAL: {route_key("voting", "orders"): 1}})
    assert route_key("voting", "orders") in store.series[ROUTE_REQUEST_TOTAL]
    # the same latency and response families are capped alike (keys agree across families)
    store.add({ROUTE_RESPONSE_TOTAL: {(*route_key("voting", "GET /r4"), "success"): 1},
               ROUTE_RESPONSE_LATENCY_MS: {route_key("voting", "GET /r4"): [1] + [0] * 26 + [0.5]}})
    assert (*route_key("voting", OTHER_LABEL_VALUE), "success") in store.series[ROUTE_RESPONSE_TOTAL]
    assert route_key("voting", OTHER_LABEL_VALUE) in store.series[ROUTE_RESPONSE_LATENCY_MS]
    # idle routes go, and new ones take their places
    now[0] = 100.0
    store.evict()
    store.add({ROUTE_REQUEST_TOTAL: {route_key("voting", "GET /new"): 1}})
    assert route_key("voting", "GET /new") in store.series[ROUTE_REQUEST_TOTAL]


def test_route_series_travel_to_the_controller_and_to_prometheus() -> None:
    t = telemetry()
    c = t.connection_open(ConnectionMeta(1, "outbound", (WEB, 40000), (VOTING, 8080), (VOTING, 8080),
                                         "http2", started=100.0))
    call(t, c, "POST", "/emojivoto.v1.VotingService/VoteDoughnut", grpc=True, grpc_status=2)
    store = NodeStore()
    store.add(t.metrics.take())
    snap = from_series(to_series(store.snapshot()))
    assert snap[ROUTE_REQUEST_TOTAL] == store.series[ROUTE_REQUEST_TOTAL]
    assert snap[REQUEST_TOTAL] == store.series[REQUEST_TOTAL]
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(store.snapshot))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    sample = next(s for s in families["route_response"].samples if s.labels.get("direction") == "inbound")
    assert sample.labels["rt_route"] == "/emojivoto.v1.VotingService/VoteDoughnut"
    assert sample.labels["classification"] == "failure" and sample.value == 1
    assert "route_response_latency_ms" in families and RESPONSE_LATENCY_MS in families


def test_configured_routes_from_the_mesh_config_win_over_automatic_names() -> None:
    t = telemetry()
    c = t.connection_open(ConnectionMeta(1, "outbound", (WEB, 40000), (VOTING, 8080), (VOTING, 8080),
                                         "http2", started=100.0))
    call(t, c, "POST", "/emojivoto.v1.VotingService/VoteDoughnut", grpc=True, grpc_status=2)
    snap = identity()
    snap.epoch, snap.version = 1, 1
    snap.config.routes.append(pb.WorkloadRoutes(
        workload=pb.Resource(namespace="emojivoto", type="deployment", name="voting"),
        rules=[pb.RouteRule(name="doughnut", grpc=True, grpc_service="emojivoto.v1.VotingService",
                            grpc_method="VoteDoughnut")]))
    assert t.apply_identity(pb.ControllerMessage(identity=snap))
    call(t, c, "POST", "/emojivoto.v1.VotingService/VoteDoughnut", grpc=True, grpc_status=2)
    call(t, c, "POST", "/emojivoto.v1.VotingService/VoteJoy", grpc=True, grpc_status=0)
    assert route_counts(t) == {
        (d, r, cl): 1 for d in ("outbound", "inbound") for r, cl in (
            ("/emojivoto.v1.VotingService/VoteDoughnut", "failure"), ("doughnut", "failure"),
            ("/emojivoto.v1.VotingService/VoteJoy", "success"))}

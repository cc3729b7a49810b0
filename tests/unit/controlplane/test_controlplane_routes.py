"""Routes over synthetic agent reports: Linkerd's `viz routes` rules, the controller's own cap,
clear errors, and route series never reaching the aggregator `stat` reads."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
NS = "emojivoto"
VOTE = "/emojivoto.v1.VotingService/"


def labels(direction: str, src: str, dst: str, route: str, service: str = "") -> dict[str, str]:
    return {"direction": direction, "src_namespace": NS, "src_kind": "deployment", "src_name": src,
            "dst_namespace": NS, "dst_kind": "deployment", "dst_name": dst, "dst_service": service,
            "rt_route": route}


def route_series(lab: dict[str, str], success: int, failure: int, bound_ms: float) -> list[pb.Series]:
    counts = [0] * N_LATENCY
    counts[BOUNDS.index(bound_ms)] = success + failure
    return [
        pb.Series(name="route_request_total", labels=lab, value=success + failure),
        pb.Series(name="route_response_total", labels={**lab, "classification": "success"}, value=success),
        pb.Series(name="route_response_total", labels={**lab, "classification": "failure"}, value=failure),
        pb.Series(name="route_response_latency_ms", labels=lab, bucket_counts=counts, sum=0.0),
    ]


def make_controller(max_routes: int = 100) -> tuple[Controller, pb.AgentHello, pb.AgentHello]:
    objects = json.loads(TESTDATA.read_text())["items"]
    reg = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    c = Controller(ControllerConfig(max_routes=max_routes), registry=reg)
    start = c.started_ms + 1000
    n1 = c.agent_connected(pb.AgentHello(agent_id="agent-1", node="node-1", start_time_ms=start))
    n2 = c.agent_connected(pb.AgentHello(agent_id="agent-2", node="node-2", start_time_ms=start))
    return c, n1, n2


@pytest.fixture
def controller() -> Controller:
    c, n1, n2 = make_controller()
    now = time.time()
    # web (node-1) -> voting (node-2): outbound on node-1 (dialled voting-svc), inbound on node-2.
    node1: list[pb.Series] = []
    node2: list[pb.Series] = []
    for method, ok, bad, ms in (("VoteJoy", 300, 0, 5.0), ("VoteDoughnut", 0, 60, 10.0), ("VotePizza", 120, 0, 5.0)):
        node1 += route_series(labels("outbound", "web", "voting", VOTE + method, "voting-svc.emojivoto"), ok, bad, ms)
        node2 += route_series(labels("inbound", "web", "voting", VOTE + method), ok, bad, ms)
    # vote-bot -> web over HTTP, same node (node-1): both directions from one observation
    for direction in ("outbound", "inbound"):
        node1 += route_series(labels(direction, "vote-bot", "web", "GET /api/vote", "web-svc.emojivoto"), 90, 10, 20.0)
        node1 += route_series(labels(direction, "vote-bot", "web", "[other]", "web-svc.emojivoto"), 6, 0, 20.0)
    c.ingest_report(n1, pb.MetricsReport(agent_id="agent-1", seq=1, series=node1), now=now - 5)
    c.ingest_report(n2, pb.MetricsReport(agent_id="agent-2", seq=1, series=node2), now=now - 5)
    return c


def routes(c: Controller, type_: str, name: str, *, to: tuple[str, str] | None = None, window: int = 60,
           ns: str = NS) -> pb.RoutesResponse:
    req = pb.RoutesRequest(selector=pb.Resource(namespace=ns, type=type_, name=name), window_seconds=window)
    if to:
        req.to.CopyFrom(pb.Resource(namespace=ns, type=to[0], name=to[1]))
    return c.routes(req)


def table(resp: pb.RoutesResponse) -> list[tuple[str, str, int, int]]:
    assert resp.error == "", resp.error
    return [(r.service, r.route, r.success_count, r.failure_count) for r in resp.rows]


def test_routes_of_a_workload_are_its_inbound_view_named_by_its_service(controller: Controller) -> None:
    resp = routes(controller, "deploy", "voting")
    assert table(resp) == [
        ("voting-svc", VOTE + "VoteDoughnut", 0, 60),
        ("voting-svc", VOTE + "VoteJoy", 300, 0),
        ("voting-svc", VOTE + "VotePizza", 120, 0),
        ("voting-svc", "[DEFAULT]", 0, 0),
    ]
    dough = resp.rows[0]
    assert dough.rps == pytest.approx(1.0) and 5 < dough.latency_ms_p50 <= 10
    assert (dough.destination.type, dough.destination.name) == ("deployment", "voting")
    default = resp.rows[-1]
    assert not default.has_traffic and default.rps == 0


def test_routes_to_is_the_callers_outbound_view(controller: Controller) -> None:
    assert table(routes(controller, "deploy", "web", to=("deploy", "voting"))) == [
        ("voting-svc", VOTE + "VoteDoughnut", 0, 60),
        ("voting-svc", VOTE + "VoteJoy", 300, 0),
        ("voting-svc", VOTE + "VotePizza", 120, 0),
        ("voting-svc", "[DEFAULT]", 0, 0),
    ]
    assert table(routes(controller, "deploy", "web", to=("deploy", "emoji"))) == []


def test_routes_other_row_comes_after_default_and_same_node_is_counted_once(controller: Controller) -> None:
    assert table(routes(controller, "deploy", "web")) == [
        ("web-svc", "GET /api/vote", 90, 10),
        ("web-svc", "[DEFAULT]", 0, 0),
        ("web-svc", "[other]", 6, 0),
    ]
    assert table(routes(controller, "svc", "web-svc")) == table(routes(controller, "deploy", "web"))


def test_routes_window_leaves_old_traffic_out(controller: Controller) -> None:
    later = time.time() + 120
    assert controller.routes(pb.RoutesRequest(selector=pb.Resource(namespace=NS, type="deploy", name="voting"),
                                              window_seconds=60), now=later).rows == []


@pytest.mark.parametrize(("type_", "name", "to", "error"), [
    ("deploy", "nope", None, 'deployment "nope" not found in namespace "emojivoto"'),
    ("deploy", "", None, "routes need one resource by name, e.g. deploy/web"),
    ("po", "web-abc", None, "resource type 'pod' is not supported (deploy, sts, ds, job, svc)"),
    ("deploy", "web", ("deploy", "gone"), 'deployment "gone" not found in namespace "emojivoto"'),
    ("svc", "web-svc", ("deploy", "voting"), "a service calls nothing: use a workload with --to"),
    ("bogus", "x", None, "unknown resource type 'bogus'"),
])
def test_routes_errors_are_one_clear_line(controller: Controller, type_: str, name: str,
                                          to: tuple[str, str] | None, error: str) -> None:
    resp = routes(controller, type_, name, to=to)
    assert error in resp.error and not resp.rows


def test_routes_unknown_namespace(controller: Controller) -> None:
    assert routes(controller, "deploy", "web", ns="nowhere").error == 'namespace "nowhere" not found'


def test_routes_controller_caps_routes_across_agents_and_stat_is_untouched() -> None:
    c, n1, n2 = make_controller(max_routes=3)
    now = time.time()
    # each agent learned a different three routes of voting; together six
    for node, first in ((n1, 0), (n2, 3)):
        series: list[pb.Series] = []
        for i in range(first, first + 3):
            series += route_series(labels("inbound", "web", "voting", f"GET /r{i}"), 10, 0, 5.0)
        c.ingest_report(node, pb.MetricsReport(agent_id=node.agent_id, seq=1, series=series), now=now - 5)
    rows = table(routes(c, "deploy", "voting"))
    assert [r[1] for r in rows] == ["GET /r0", "GET /r1", "GET /r2", "[DEFAULT]", "[other]"]
    assert rows[-1][2] == 30 and sum(r[2] for r in rows) == 60   # nothing lost
    assert len(c.aggregator) == 0           # route series never reach the peer aggregator
    assert len(c.route_aggregator) == 4


def test_routes_annotation_on_services_and_workloads_reaches_mesh_config() -> None:
    c, _, _ = make_controller()
    reg = c.registry
    svc = copy.deepcopy(reg.get("Service", NS, "voting-svc"))
    svc["metadata"].setdefault("annotations", {})["nodemesh.io/routes"] = json.dumps([
        {"name": "doughnut", "grpc": "emojivoto.v1.VotingService/VoteDoughnut"},
        {"name": "any-vote", "grpc": "emojivoto.v1.VotingService/"},
    ])
    reg.apply("MODIFIED", svc)
    web = copy.deepcopy(reg.get("Deployment", NS, "web"))
    web["metadata"].setdefault("annotations", {})["nodemesh.io/routes"] = json.dumps([
        {"name": "vote", "method": "get", "path": "/api/vote", "type": "exact"}])
    reg.apply("MODIFIED", web)
    bad = copy.deepcopy(reg.get("Deployment", NS, "emoji"))
    bad["metadata"].setdefault("annotations", {})["nodemesh.io/routes"] = '[{"path": "/no-name"}]'
    reg.apply("MODIFIED", bad)
    got = {(w.workload.type, w.workload.name): [(r.name, r.grpc, r.grpc_service, r.grpc_method, r.method, r.path,
                                                 r.path_type) for r in w.rules]
           for w in c.mesh_config().routes}
    assert got == {
        ("deployment", "voting"): [("doughnut", True, "emojivoto.v1.VotingService", "VoteDoughnut", "", "", ""),
                                   ("any-vote", True, "emojivoto.v1.VotingService", "", "", "", "")],
        ("deployment", "web"): [("vote", False, "", "", "GET", "/api/vote", "exact")],
    }  # emoji's annotation has a route without a name: skipped, nothing else breaks
    # the pushed identity carries them (agents get them with the mesh config)
    assert len(c.identity_message().identity.config.routes) == 2

"""StatSummary/Edges semantics over a synthetic set of agent reports (Linkerd's viz stat rules)."""

from __future__ import annotations

import time

import pytest
from controller_feed import NS, PODS, peer, series_for
from controller_testkit import stat
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller


def rows(resp: pb.StatResponse) -> dict[str, pb.StatRow]:
    assert resp.error == ""
    return {r.resource.name: r for r in resp.rows}


def test_workload_rows_are_the_inbound_view(controller: Controller) -> None:
    r = rows(stat(controller, "deploy"))
    assert list(r) == ["emoji", "vote-bot", "voting", "web"]
    emoji = r["emoji"]
    assert (emoji.success_count, emoji.failure_count) == (540, 60)
    assert emoji.rps == pytest.approx(600 / 60)
    assert 10 < emoji.latency_ms_p50 <= 20 and 10 < emoji.latency_ms_p99 <= 20
    assert r["voting"].rps == pytest.approx(5.0) and 50 < r["voting"].latency_ms_p95 <= 100
    assert r["web"].rps == pytest.approx(2.0)
    # vote-bot only calls: no inbound traffic, but it still gets its row.
    assert not r["vote-bot"].has_traffic and r["vote-bot"].rps == 0
    assert r["emoji"].tcp_open_connections == 2 and r["emoji"].tcp_read_bytes_rate == pytest.approx(100.0)


def test_meshed_counts_ready_agents_and_captured_namespaces(controller: Controller) -> None:
    r = rows(stat(controller, "deploy"))
    assert (r["emoji"].meshed_pods, r["emoji"].total_pods) == (1, 2)   # one pod on node-1, one on node-2
    assert (r["web"].meshed_pods, r["web"].total_pods) == (1, 1)
    assert (r["voting"].meshed_pods, r["voting"].total_pods) == (0, 1)  # node-2 agent not ready
    controller.agent_message(controller.sessions["agent-2"], pb.AgentMessage(status=pb.AgentStatus(ready=True)))
    r = rows(stat(controller, "deploy"))
    assert r["voting"].meshed_pods == 1 and r["emoji"].meshed_pods == 2
    legacy = rows(stat(controller, "deploy", ns="legacy"))["old"]
    assert (legacy.meshed_pods, legacy.total_pods) == (0, 1)  # namespace has capture disabled


def test_from_is_the_outbound_view_per_destination(controller: Controller) -> None:
    r = rows(stat(controller, "deploy", frm=("deploy", "web")))
    assert sorted(r) == ["emoji", "voting"]  # only destinations web called
    assert r["emoji"].rps == pytest.approx(10.0) and r["voting"].rps == pytest.approx(5.0)
    assert r["emoji"].failure_count == 60


def test_to_is_the_callers_outbound_view(controller: Controller) -> None:
    r = rows(stat(controller, "deploy", to=("deploy", "web")))
    assert list(r) == ["vote-bot"] and r["vote-bot"].rps == pytest.approx(2.0)
    r = rows(stat(controller, "deploy", to=("svc", "voting-svc")))
    assert list(r) == ["web"] and r["web"].success_count == 300


def test_services_from_clients_outbound_observations(controller: Controller) -> None:
    r = rows(stat(controller, "svc"))
    assert r["emoji-svc"].rps == pytest.approx(10.0)      # counted once, not once per direction
    assert r["voting-svc"].success_count == 300
    assert r["web-svc"].rps == pytest.approx(2.0)
    assert (r["emoji-svc"].meshed_pods, r["emoji-svc"].total_pods) == (1, 2)


def test_namespace_and_pod_rows(controller: Controller) -> None:
    r = rows(stat(controller, "ns"))
    assert set(r) == {"default", "emojivoto", "kube-system", "legacy"}
    assert r["emojivoto"].rps == pytest.approx((600 + 300 + 120) / 60)
    assert not r["legacy"].has_traffic
    one = rows(stat(controller, "ns", "emojivoto"))
    assert list(one) == ["emojivoto"]
    pods = rows(stat(controller, "po"))
    assert pods[PODS["emoji"]].rps == pytest.approx(10.0) and pods[PODS["emoji"]].status == "Running"
    assert pods["migrate-x7k2p"].status == "Succeeded" and pods["migrate-x7k2p"].total_pods == 0
    rs = rows(stat(controller, "rs", "emoji-6b8f4c7d9"))
    assert rs["emoji-6b8f4c7d9"].success_count == 540


def test_all_and_label_selector_and_all_namespaces(controller: Controller) -> None:
    types = {(r.resource.type, r.resource.name) for r in stat(controller, "all").rows}
    assert ("deployment", "web") in types and ("service", "web-svc") in types and ("pod", "debug") in types
    assert ("statefulset", "db") in types and ("daemonset", "logger") in types and ("job", "migrate") in types
    assert list(rows(stat(controller, "deploy", labels="app in (web-svc,voting-svc)"))) == ["voting", "web"]
    assert list(rows(stat(controller, "deploy", labels="app!=web-svc,app.kubernetes.io/part-of"))) == [
        "emoji", "vote-bot", "voting"]
    every = stat(controller, "deploy", all_ns=True)
    assert {(r.resource.namespace, r.resource.name) for r in every.rows} >= {("legacy", "old"), (NS, "web")}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"type_": "frobs"}, "unknown resource type 'frobs'"),
    ({"type_": "deploy", "window": 5}, "too short"),
    ({"type_": "deploy", "window": 7200}, "too long"),
    ({"type_": "all", "frm": ("deploy", "web")}, "cannot be used with resource type 'all'"),
    ({"type_": "deploy", "frm": ("all", "")}, "'all' is not a valid resource for --from"),
    ({"type_": "deploy", "frm": ("deploy", "web"), "to": ("deploy", "emoji")}, "cannot be used together"),
    ({"type_": "deploy", "ns": "nope"}, 'namespace "nope" not found'),
    ({"type_": "deploy", "name": "nope"}, 'deployment "nope" not found in namespace "emojivoto"'),
    ({"type_": "deploy", "labels": "a=(b"}, "invalid label selector"),
])
def test_user_errors_are_one_line(controller: Controller, kwargs: dict, message: str) -> None:
    type_ = kwargs.pop("type_")
    resp = stat(controller, type_, **kwargs)
    assert message in resp.error and "\n" not in resp.error and not resp.rows


def test_window_excludes_old_traffic(controller: Controller) -> None:
    later = time.time() + 120
    r = rows(controller.stat(pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60),
                             now=later))
    assert not r["emoji"].has_traffic


def test_edges(controller: Controller) -> None:
    resp = controller.edges(pb.EdgesRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60))
    assert resp.error == ""
    assert [(e.src.name, e.dst.name) for e in resp.edges] == [("vote-bot", "web"), ("web", "emoji"),
                                                              ("web", "voting")]
    pods = controller.edges(pb.EdgesRequest(selector=pb.Resource(namespace=NS, type="po"), window_seconds=60))
    assert (PODS["web"], PODS["voting"]) in [(e.src.name, e.dst.name) for e in pods.edges]


def test_check_reports_each_node(controller: Controller) -> None:
    resp = controller.check()
    nodes = {n.node: n for n in resp.nodes}
    assert nodes["node-1"].agent_connected and nodes["node-1"].agent_ready and nodes["node-1"].capture_installed
    assert nodes["node-2"].agent_connected and not nodes["node-2"].agent_ready
    assert nodes["node-1"].agent_version == "0.1.0" and 0 <= nodes["node-1"].last_report_age_ms < 60_000


def _edge_tls(c: Controller) -> dict[tuple[str, str], pb.Edge]:
    resp = c.edges(pb.EdgesRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60))
    assert resp.error == ""
    return {(e.src.name, e.dst.name): e for e in resp.edges}


def test_edges_plaintext_cross_node_and_same_node_are_not_secured(controller: Controller) -> None:
    edges = _edge_tls(controller)
    cross = edges[("web", "voting")]
    assert not cross.secured and (cross.client_id, cross.server_id) == ("", "")
    assert cross.no_identity_msg.startswith("not mTLS")
    same = edges[("web", "emoji")]  # both pods on node-1: the agent relayed it locally
    assert not same.secured and same.no_identity_msg.startswith("same node")


def test_edges_show_the_identities_each_side_verified(controller: Controller) -> None:
    """web (node-1) -> voting (node-2) over mTLS: node-1's outbound series name the server's
    SPIFFE ID, node-2's inbound series the client's; the edge is secured with both."""
    c = Controller(ControllerConfig(), registry=controller.registry)
    start = c.started_ms + 1000
    n1 = c.agent_connected(pb.AgentHello(agent_id="a1", node="node-1", version="0.1.0", start_time_ms=start))
    n2 = c.agent_connected(pb.AgentHello(agent_id="a2", node="node-2", version="0.1.0", start_time_ms=start))
    web_id, voting_id = (f"spiffe://cluster.local/ns/{NS}/sa/{sa}" for sa in ("web", "voting"))
    out = {**peer("outbound", "web", "voting", "voting-svc"), "tls": "true", "server_id": voting_id}
    inb = {**peer("inbound", "web", "voting", "voting-svc"), "tls": "true", "client_id": web_id}
    now = time.time()
    c.ingest_report(n1, pb.MetricsReport(agent_id="a1", seq=1, series=series_for(out, 10, 0, 5.0)), now=now - 5)
    c.ingest_report(n2, pb.MetricsReport(agent_id="a2", seq=1, series=series_for(inb, 10, 0, 5.0)), now=now - 5)
    edge = _edge_tls(c)[("web", "voting")]
    assert (edge.secured, edge.client_id, edge.server_id, edge.no_identity_msg) == (True, web_id, voting_id, "")
    # Then a connection falls back to plaintext (fail-open): the edge is only partly secured.
    c.ingest_report(n1, pb.MetricsReport(agent_id="a1", seq=2, series=series_for(
        peer("outbound", "web", "voting", "voting-svc"), 1, 0, 5.0)), now=now - 4)
    edge = _edge_tls(c)[("web", "voting")]
    assert not edge.secured and edge.client_id == web_id and edge.no_identity_msg.startswith("partly plaintext")

"""Metrics classification, the same-node rule, snapshots/merge, and the Prometheus text export."""

from __future__ import annotations

import pytest
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import (
    METRICS,
    classify,
    from_series,
    merge,
    to_series,
    without_gauges,
)
from nodemesh.agent.metrics_export import SnapshotCollector
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import LATENCY_BUCKETS_MS, PEER_LABELS, RESPONSE_LABELS
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

WEB, EMOJI, VOTING = "10.244.1.5", "10.244.1.6", "10.244.2.7"   # web, emoji on node-1; voting on node-2
EMOJI_SVC = "10.96.0.20"


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot(resource_version="1")
    for ip, name, node in ((WEB, "web", "node-1"), (EMOJI, "emoji", "node-1"), (VOTING, "voting", "node-2")):
        snap.pods.append(pb.Pod(ip=ip, namespace="emojivoto", name=f"{name}-abc", node=node,
                                owner=pb.Resource(namespace="emojivoto", type="deployment", name=name),
                                ready=True))
    snap.services.append(pb.Service(namespace="emojivoto", name="emoji-svc", cluster_ip=EMOJI_SVC,
                                    ports=[pb.ServicePort(name="grpc", port=8080, target_port=8080)],
                                    endpoints=[pb.Endpoint(ip=EMOJI, ready=True)]))
    return snap


@pytest.fixture
def tel() -> WorkerTelemetry:
    t = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    t.index.update(identity())
    return t


def conn(t: WorkerTelemetry, src: str, dst: str, *, via: str | None = None, direction: str = "outbound",
         protocol: str = "http2", cid: int = 1):  # type: ignore[no-untyped-def]
    meta = ConnectionMeta(cid, direction, (src, 40000), (via or dst, 8080), (dst, 8080), protocol, started=100.0)
    return t.connection_open(meta)


def request(t: WorkerTelemetry, c, *, status: int | None, grpc: bool = False,  # type: ignore[no-untyped-def]
            grpc_status: int | None = None, reset: str | None = None, latency_s: float = 0.004,
            sid: int = 1) -> None:
    r = t.request_start(c, RequestHead("POST" if grpc else "GET", "http", "emoji-svc:8080", "/x",
                                       grpc=grpc, stream_id=sid, started=200.0))
    if status is not None:
        t.response_start(r, status, [], 200.0 + latency_s)
    t.request_end(r, RequestEnd(grpc_status=grpc_status, reset_error=reset, response_bytes=5, ended=201.0))


def responses(t: WorkerTelemetry) -> dict[tuple[str, ...], int]:
    """{(direction, src_name, dst_name, status, grpc_status, classification, error): count}"""
    out: dict[tuple[str, ...], int] = {}
    names = PEER_LABELS + RESPONSE_LABELS
    for key, n in t.metrics.response_total.items():
        d = dict(zip(names, key))
        k = (d["direction"], d["src_name"], d["dst_name"], d["status_code"], d["grpc_status"],
             d["classification"], d["error"])
        out[k] = out.get(k, 0) + n
    return out


@pytest.mark.parametrize(("args", "want"), [
    ((200, False, None, None), ("200", "", "success", "")),
    ((404, False, None, None), ("404", "", "success", "")),
    ((503, False, None, None), ("503", "", "failure", "")),
    ((200, True, 0, None), ("200", "0", "success", "")),
    ((200, True, 14, None), ("200", "14", "failure", "")),          # grpc-status decides, HTTP 200
    ((500, True, 0, None), ("500", "0", "success", "")),            # ...whatever the HTTP status
    ((200, True, None, "CANCEL"), ("200", "", "failure", "CANCEL")),  # reset before trailers
    ((200, True, 0, "CANCEL"), ("200", "0", "success", "")),        # reset after the RPC ended
    ((200, True, None, None), ("200", "", "failure", "missing grpc-status")),
    ((None, False, None, "connection closed"), ("", "", "failure", "connection closed")),
    ((200, False, None, "connection closed"), ("200", "", "failure", "connection closed")),
    ((None, False, None, None), ("", "", "failure", "no response")),
])
def test_classify(args: tuple, want: tuple) -> None:  # type: ignore[type-arg]
    assert classify(*args) == want


def test_grpc_trailers_only_and_resets_through_the_observer(tel: WorkerTelemetry) -> None:
    c = conn(tel, WEB, VOTING)
    request(tel, c, status=200, grpc=True, grpc_status=0, sid=1)
    request(tel, c, status=200, grpc=True, grpc_status=5, sid=3)   # trailers-only NOT_FOUND
    request(tel, c, status=None, reset="REFUSED_STREAM", sid=5)     # reset before any response
    request(tel, c, status=502, sid=7)
    got = responses(tel)
    assert got == {
        ("outbound", "web", "voting", "200", "0", "success", ""): 1,
        ("outbound", "web", "voting", "200", "5", "failure", ""): 1,
        ("outbound", "web", "voting", "", "", "failure", "REFUSED_STREAM"): 1,
        ("outbound", "web", "voting", "502", "", "failure", ""): 1,
    }
    # latency: only requests that got response headers, 4 ms each -> bucket le=4
    (hist,) = tel.metrics.response_latency.values()
    assert hist[LATENCY_BUCKETS_MS.index(4)] == 3 and sum(hist[:-1]) == 3
    assert hist[-1] == pytest.approx(12.0)


def test_same_node_request_recorded_once_per_direction(tel: WorkerTelemetry) -> None:
    # web -> emoji-svc ClusterIP, endpoint emoji on this node: outbound AND inbound from one observation.
    c = conn(tel, WEB, EMOJI, via=EMOJI_SVC)
    request(tel, c, status=200)
    request(tel, c, status=500, sid=2)
    tel.connection_close(c, ConnectionEnd(read_bytes=10, write_bytes=20, ended=103.0))
    got = responses(tel)
    assert got == {
        ("outbound", "web", "emoji", "200", "", "success", ""): 1,
        ("inbound", "web", "emoji", "200", "", "success", ""): 1,
        ("outbound", "web", "emoji", "500", "", "failure", ""): 1,
        ("inbound", "web", "emoji", "500", "", "failure", ""): 1,
    }
    by_dir: dict[str, int] = {}
    for key, n in tel.metrics.request_total.items():
        d = dict(zip(PEER_LABELS, key))
        assert d["dst_service"] == "emoji-svc.emojivoto" and d["dst_pod"] == "emoji-abc"
        by_dir[d["direction"]] = by_dir.get(d["direction"], 0) + n
    assert by_dir == {"outbound": 2, "inbound": 2}
    assert sorted(k[0] for k in tel.metrics.tcp_open_total) == ["inbound", "outbound"]
    assert all(v == 0 for v in tel.metrics.tcp_open_connections.values())
    assert set(tel.metrics.tcp_read_bytes.values()) == {10}
    (dur,) = {tuple(v) for v in tel.metrics.tcp_duration.values()}
    assert dur[LATENCY_BUCKETS_MS.index(3000)] == 1  # 3 s connection


def test_same_node_edge_cases_never_double_count() -> None:
    snap = identity()
    snap.pods.append(pb.Pod(ip="10.244.1.40", namespace="legacy", name="old-0", node="node-1",
                            owner=pb.Resource(namespace="legacy", type="pod", name="old-0")))
    snap.config.excluded_namespaces.append("legacy")
    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    tel.index.update(snap)
    # Callee's namespace not captured: only the outbound view, as it would be across nodes.
    request(tel, conn(tel, WEB, "10.244.1.40", cid=1), status=200)
    # A captured local pod's request reaching the inbound listener too: already counted, skip it.
    request(tel, conn(tel, WEB, EMOJI, direction="inbound", cid=2), status=200)
    # An uncaptured local pod calling in: only the inbound listener saw it, so it counts.
    request(tel, conn(tel, "10.244.1.40", EMOJI, direction="inbound", cid=3), status=200)
    assert responses(tel) == {
        ("outbound", "web", "old-0", "200", "", "success", ""): 1,
        ("inbound", "old-0", "emoji", "200", "", "success", ""): 1,
    }
    assert sum(tel.metrics.tcp_open_total.values()) == 2


def test_cross_node_and_inbound_counted_once(tel: WorkerTelemetry) -> None:
    request(tel, conn(tel, WEB, VOTING, cid=1), status=200)            # to node-2: outbound only
    request(tel, conn(tel, VOTING, WEB, direction="inbound", cid=2), status=200)  # arriving: inbound only
    request(tel, conn(tel, "203.0.113.9", WEB, direction="inbound", cid=3), status=200)
    got = responses(tel)
    assert got == {
        ("outbound", "web", "voting", "200", "", "success", ""): 1,
        ("inbound", "voting", "web", "200", "", "success", ""): 1,
        ("inbound", "203.0.113.9", "web", "200", "", "success", ""): 1,  # unknown: name = IP, kept
    }
    unknown = [dict(zip(PEER_LABELS, k)) for k in tel.metrics.request_total if k[3] == "203.0.113.9"]
    assert unknown[0]["src_kind"] == "unknown" and unknown[0]["src_namespace"] == ""


def test_request_end_twice_and_informational_responses(tel: WorkerTelemetry) -> None:
    c = conn(tel, WEB, VOTING, protocol="http1")
    r = tel.request_start(c, RequestHead("POST", "http", "v", "/", started=1.0))
    tel.response_start(r, 100, [], 1.001)        # 100-continue is not the response
    tel.response_start(r, 201, [], 1.009)
    tel.request_end(r, RequestEnd(ended=1.02))
    tel.request_end(r, RequestEnd(ended=1.03))   # a second end must not count again
    assert sum(tel.metrics.response_total.values()) == 1
    (hist,) = tel.metrics.response_latency.values()
    assert hist[LATENCY_BUCKETS_MS.index(10)] == 1


def test_merge_series_roundtrip_and_gauges(tel: WorkerTelemetry) -> None:
    c = conn(tel, WEB, VOTING)
    request(tel, c, status=200)
    a = tel.metrics.snapshot()
    request(tel, c, status=200, sid=3)
    b = tel.metrics.snapshot()
    m = merge([a, b])
    assert sum(m["request_total"].values()) == 3
    assert sum(m["tcp_open_connections"].values()) == 2
    assert "tcp_open_connections" not in without_gauges(m) and "request_total" in without_gauges(m)
    back = from_series(to_series(m))
    assert back == {name: {k: (list(map(float, v)) if isinstance(v, list) else float(v))
                           for k, v in m[name].items()} for name in METRICS}


def test_prometheus_text_parses_back(tel: WorkerTelemetry) -> None:
    c = conn(tel, WEB, EMOJI, via=EMOJI_SVC)
    for i in range(5):
        request(tel, c, status=200, grpc=True, grpc_status=0 if i else 2, sid=2 * i + 1, latency_s=0.025)
    tel.connection_close(c, ConnectionEnd(read_bytes=300, write_bytes=700, ended=100.5))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(tel.metrics.snapshot))
    text = generate_latest(reg).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["request"].type == "counter"
    req = {(s.labels["direction"], s.name): s.value for s in fams["request"].samples}
    assert req == {("outbound", "request_total"): 5, ("inbound", "request_total"): 5}
    resp = {(s.labels["direction"], s.labels["grpc_status"], s.labels["classification"]): s.value
            for s in fams["response"].samples if s.name == "response_total"}
    assert resp == {("outbound", "0", "success"): 4, ("outbound", "2", "failure"): 1,
                    ("inbound", "0", "success"): 4, ("inbound", "2", "failure"): 1}
    lat = fams["response_latency_ms"]
    assert lat.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in lat.samples
               if s.name == "response_latency_ms_bucket" and s.labels["direction"] == "outbound"}
    assert buckets["20"] == 0 and buckets["30"] == 5 and buckets["+Inf"] == 5
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1
    counts = [s.value for s in lat.samples if s.name == "response_latency_ms_count"]
    assert counts == [5, 5]
    rd = {s.labels["direction"]: s.value for s in fams["tcp_read_bytes"].samples
          if s.name == "tcp_read_bytes_total"}
    assert rd == {"outbound": 300, "inbound": 300}
    gauge = fams["tcp_open_connections"]
    assert gauge.type == "gauge" and all(s.value == 0 for s in gauge.samples)
    assert {s.labels["error"] for s in fams["tcp_close"].samples} == {""}


def test_mtls_connections_carry_the_verified_identity_labels(tel: WorkerTelemetry) -> None:
    """A tunnelled connection's series say tls="true" and the peer the agent verified: the client
    on the inbound side, the server on the outbound side (what `nodemesh edges` reads). An
    outbound tunnel that falls back to plaintext after its first counts moves its open gauge."""
    voting_id = "spiffe://cluster.local/ns/emojivoto/sa/voting"
    meta = ConnectionMeta(1, "outbound", (WEB, 40000), (VOTING, 8080), (VOTING, 8080), "http1", started=100.0,
                          mtls=voting_id)
    c = tel.connection_open(meta)
    request(tel, c, status=200)
    by_name = [dict(zip(PEER_LABELS, k)) for k in tel.metrics.request_total]
    assert [(d["tls"], d["client_id"], d["server_id"]) for d in by_name] == [("true", "", voting_id)]
    # Fell back (the far node had no tunnel): the connection is plaintext from here on.
    meta.mtls = None
    tel.connection_secured(c, None)
    request(tel, c, status=200, sid=2)
    gauges = {dict(zip(PEER_LABELS, k))["tls"]: v for k, v in tel.metrics.tcp_open_connections.items()}
    assert gauges == {"true": 0, "": 1}
    assert sorted(dict(zip(PEER_LABELS, k))["tls"] for k in tel.metrics.request_total) == ["", "true"]

    web_id = "spiffe://cluster.local/ns/emojivoto/sa/web"
    inbound = tel.connection_open(ConnectionMeta(2, "inbound", (VOTING, 40001), (WEB, 8080), (WEB, 8080), "http1",
                                                 started=100.0, mtls=web_id))
    request(tel, inbound, status=200)
    inb = [dict(zip(PEER_LABELS, k)) for k in tel.metrics.request_total if k[0] == "inbound"]
    assert [(d["tls"], d["client_id"], d["server_id"]) for d in inb] == [("true", web_id, "")]

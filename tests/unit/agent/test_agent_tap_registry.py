"""Tap matching, the per-tap rate cap, and the three events of an admitted request."""

from __future__ import annotations

import time

import pytest
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.observe import ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.tap import Tap, TapRegistry, resource_matches
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb

WEB = ("emojivoto", "deployment", "web", "web-abc")
VOTING = ("emojivoto", "deployment", "voting", "voting-xyz")
OTHER = ("other", "statefulset", "db", "db-0")
UNKNOWN = ("", "unknown", "203.0.113.9", "")


def R(type_: str, name: str = "", ns: str = "") -> pb.Resource:
    return pb.Resource(namespace=ns, type=type_, name=name)


def head(method: str = "GET", path: str = "/api/vote", authority: str = "web-svc:80") -> RequestHead:
    return RequestHead(method, "http", authority, path)


@pytest.mark.parametrize(("res", "peer", "service", "want"), [
    (R("deployment", "web", "emojivoto"), WEB, "", True),
    (R("deployment", "web", "other"), WEB, "", False),
    (R("deployment", "web"), WEB, "", True),            # no namespace: any
    (R("deployment"), VOTING, "", True),                # no name: every deployment
    (R("statefulset"), WEB, "", False),
    (R("pod", "web-abc", "emojivoto"), WEB, "", True),
    (R("pod", "web-xyz"), WEB, "", False),
    (R("namespace", "emojivoto"), WEB, "", True),
    (R("namespace", "emojivoto"), OTHER, "", False),
    (R("namespace", "emojivoto"), UNKNOWN, "", False),
    (R("all", "", "emojivoto"), VOTING, "", True),
    (R("all"), UNKNOWN, "", False),
    (R("service", "voting-svc", "emojivoto"), VOTING, "voting-svc.emojivoto", True),
    (R("service", "voting-svc", "emojivoto"), VOTING, "", False),
])
def test_resource_matches(res: pb.Resource, peer: tuple, service: str, want: bool) -> None:  # type: ignore[type-arg]
    assert resource_matches(res, peer, service) is want


OUT, IN, BOTH = ("outbound",), ("inbound",), ("outbound", "inbound")


def test_sightings_are_the_targets_own() -> None:
    """As Linkerd's tap shows what the target's proxies saw: its outbound calls and what it
    received, never the caller's side of a request to it (that would show it twice)."""
    t = Tap("t", pb.TapFilter(target=R("deployment", "voting", "emojivoto")), 100)
    assert t.sightings(WEB, VOTING, "", head(), IN) == IN        # received, from another node
    assert t.sightings(WEB, VOTING, "", head(), OUT) == ()       # web's node: web's sighting, not voting's
    assert t.sightings(WEB, VOTING, "", head(), BOTH) == IN      # one node: shown as voting saw it
    assert t.sightings(VOTING, OTHER, "", head(), OUT) == OUT    # voting's own call
    assert t.sightings(WEB, OTHER, "", head(), BOTH) == ()
    ns = Tap("n", pb.TapFilter(target=R("namespace", "emojivoto")), 100)
    assert ns.sightings(WEB, VOTING, "", head(), BOTH) == BOTH   # both ends in the namespace
    to = Tap("t", pb.TapFilter(target=R("deployment", "web"), to=R("deployment", "voting")), 100)
    assert to.sightings(WEB, VOTING, "", head(), OUT) == OUT
    assert to.sightings(WEB, VOTING, "", head(), BOTH) == OUT    # --to: the caller's side only
    assert to.sightings(WEB, VOTING, "", head(), IN) == ()
    assert to.sightings(VOTING, WEB, "", head(), OUT) == ()      # --to is about the destination only
    assert to.sightings(WEB, OTHER, "", head(), OUT) == ()
    svc = Tap("s", pb.TapFilter(target=R("service", "voting-svc", "emojivoto")), 100)
    assert svc.sightings(WEB, VOTING, "voting-svc.emojivoto", head(), OUT) == OUT
    assert svc.sightings(WEB, VOTING, "", head(), IN) == ()      # only a client knows the Service


def test_filter_method_path_authority_scheme() -> None:
    f = pb.TapFilter(target=R("deployment", "web"), method="post", path_prefix="/api/",
                     authority="web-svc:80", scheme="http")
    t = Tap("t", f, 100)
    assert t.sightings(WEB, VOTING, "", head("POST"), OUT)
    assert not t.sightings(WEB, VOTING, "", head("GET"), OUT)
    assert not t.sightings(WEB, VOTING, "", head("POST", path="/static/x"), OUT)
    assert not t.sightings(WEB, VOTING, "", head("POST", authority="other:80"), OUT)


def test_token_bucket_caps_and_refills() -> None:
    reg = TapRegistry()
    tap = reg.open("t", pb.TapFilter(target=R("deployment", "web"), max_rps=10))
    now = time.monotonic()
    admitted = sum(tap.admit(now) for _ in range(50))
    assert admitted == 10 and tap.dropped == 40          # a one-second burst, then nothing
    assert sum(tap.admit(now + 0.5) for _ in range(50)) == 5  # half a second refills half
    assert reg.open("d", pb.TapFilter(target=R("all"))).rate == 100.0  # 0 -> the config default


def events_for(tel: WorkerTelemetry, n: int) -> list[pb.TapEvent]:
    got: list[pb.TapEvent] = []
    tel._emit = got.append  # type: ignore[method-assign]  # in place of the link to the parent
    meta = ConnectionMeta(7, "outbound", ("10.244.1.5", 41000), ("10.96.0.9", 80), ("10.244.2.7", 8080),
                          "http1", started=time.monotonic())
    c = tel.connection_open(meta)
    for i in range(n):
        t0 = time.monotonic()
        r = tel.request_start(c, RequestHead("GET", "http", "voting-svc", f"/vote/{i}",
                                             headers=[("user-agent", "t")], stream_id=i + 1, started=t0))
        tel.response_start(r, 503, [("server", "x")], t0 + 0.002)
        tel.request_end(r, RequestEnd(response_bytes=42, ended=t0 + 0.005, reset_error=None))
    return got


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot()
    for ip, name in (("10.244.1.5", "web"), ("10.244.2.7", "voting")):
        snap.pods.append(pb.Pod(ip=ip, namespace="emojivoto", name=f"{name}-abc", node="node-1",
                                owner=pb.Resource(namespace="emojivoto", type="deployment", name=name)))
    return snap


def test_three_events_per_admitted_request_and_cap() -> None:
    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    tel.index.update(identity())
    assert events_for(tel, 3) == []                      # no tap open: nothing produced
    tel.taps.open("tap-1", pb.TapFilter(target=R("deployment", "voting", "emojivoto"), max_rps=5))
    got = events_for(tel, 20)
    assert len(got) == 15                                # 5 admitted requests x 3 events
    kinds = [e.WhichOneof("event") for e in got]
    assert kinds == ["request_init", "response_init", "response_end"] * 5
    assert tel.taps.taps["tap-1"].dropped == 15
    req, rsp, end = got[:3]
    assert {e.request_id for e in got[:3]} == {"7:1"} and req.tap_id == "tap-1"
    # web and voting share node-1: one observation, shown as voting (the target) saw it
    assert req.direction == "inbound" and req.node == "node-1"
    assert (req.source.ip, req.source.port, req.source.owner.name) == ("10.244.1.5", 41000, "web")
    assert (req.destination.pod, req.destination.owner.type) == ("voting-abc", "deployment")
    assert (req.request_init.method, req.request_init.path, req.request_init.authority) == (
        "GET", "/vote/0", "voting-svc")
    assert [(h.name, h.value) for h in req.request_init.headers] == [("user-agent", "t")]
    assert rsp.response_init.http_status == 503
    assert 1900 <= rsp.response_init.since_request_init_us <= 2100
    assert end.response_end.response_bytes == 42 and not end.response_end.has_grpc_status
    assert 4900 <= end.response_end.since_request_init_us <= 5100
    tel.taps.close("tap-1")
    assert events_for(tel, 3) == [] and not tel.taps.taps


def test_unmatched_tap_produces_nothing() -> None:
    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    tel.index.update(identity())
    tel.taps.open("t", pb.TapFilter(target=R("deployment", "emoji", "emojivoto")))
    assert events_for(tel, 5) == []

"""Tap redaction (agent/redact.py), and that the worker's tap events carry it: secrets are taken
out at the agent, in HTTP/1 and HTTP/2 header lists alike, before an event leaves the node."""

from __future__ import annotations

import time

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.observe import ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.redact import DEFAULT, REDACTED, Redaction
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb

H1 = [("Host", "web"), ("Authorization", "Bearer s3cret"), ("Cookie", "sid=abc"), ("X-Api-Key", "k1"),
      ("Accept", "*/*")]
H2 = [(":method", "GET"), (":path", "/search?q=pw&page=2"), (":authority", "web"), ("authorization", "Basic eA=="),
      ("proxy-authorization", "Basic eQ=="), ("set-cookie", "sid=1"), ("x-api-key", "k2")]


def test_agent_tap_redact_defaults_hide_credentials_and_keep_the_rest() -> None:
    assert DEFAULT.headers(H1) == [("Host", "web"), ("Authorization", REDACTED), ("Cookie", REDACTED),
                                   ("X-Api-Key", "k1"), ("Accept", "*/*")]
    out = dict(DEFAULT.headers(H2))
    assert out["authorization"] == out["proxy-authorization"] == out["set-cookie"] == REDACTED
    assert out[":path"] == "/search?q=pw&page=2" and out["x-api-key"] == "k2"  # query kept by default
    assert DEFAULT.path("/a?token=x") == "/a?token=x"


def test_agent_tap_redact_deny_list_allow_list_and_query() -> None:
    deny = Redaction.build(deny=["X-API-Key "])
    assert dict(deny.headers(H1))["X-Api-Key"] == REDACTED and dict(deny.headers(H2))["x-api-key"] == REDACTED
    allow = Redaction.build(allow=["accept", "host", "authorization"])
    out = dict(allow.headers(H1))
    # Only listed headers keep values; the credentials stay redacted even when listed.
    assert out == {"Host": "web", "Authorization": REDACTED, "Cookie": REDACTED, "X-Api-Key": REDACTED,
                   "Accept": "*/*"}
    assert dict(allow.headers(H2))[":method"] == "GET"  # pseudo-headers are the request line
    query = Redaction.build(query=True)
    assert query.path("/search?q=pw&page=2#top") == f"/search?q={REDACTED}&page={REDACTED}#top"
    assert query.path("/a?abc123") == f"/a?{REDACTED}"
    assert query.path("/plain") == "/plain"
    assert dict(query.headers(H2))[":path"] == f"/search?q={REDACTED}&page={REDACTED}"


def _tap_events(config: pb.MeshConfig | None) -> list[pb.TapEvent]:
    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    snap = pb.IdentitySnapshot(epoch=1, version=1)
    if config is not None:
        snap.config.CopyFrom(config)
    for ip, name in (("10.244.1.5", "web"), ("10.244.2.7", "voting")):
        snap.pods.append(pb.Pod(ip=ip, namespace="rt", name=f"{name}-abc", node="node-1",
                                owner=pb.Resource(namespace="rt", type="deployment", name=name)))
    tel.apply_identity(pb.ControllerMessage(identity=snap))
    got: list[pb.TapEvent] = []
    tel._emit = got.append  # type: ignore[method-assign]  # in place of the link to the parent
    tel.taps.open("t", pb.TapFilter(target=pb.Resource(namespace="rt", type="deployment", name="voting")))
    meta = ConnectionMeta(3, "outbound", ("10.244.1.5", 41000), ("10.244.2.7", 80), ("10.244.2.7", 80),
                          "http2", started=time.monotonic())
    c = tel.connection_open(meta)
    t0 = time.monotonic()
    r = tel.request_start(c, RequestHead("GET", "http", "voting", "/vote?user=alice", headers=H2, stream_id=1,
                                         started=t0))
    tel.response_start(r, 200, [(":status", "200"), ("set-cookie", "sid=2"), ("x-api-key", "k3")], t0 + 0.001)
    tel.request_end(r, RequestEnd(response_bytes=1, ended=t0 + 0.002, reset_error=None))
    return got


def test_agent_tap_redact_worker_events_follow_the_mesh_config_live() -> None:
    req, rsp, _ = _tap_events(None)  # no mesh config yet: the defaults
    headers = {h.name: h.value for h in req.request_init.headers}
    assert headers["authorization"] == headers["proxy-authorization"] == REDACTED
    assert "Basic" not in req.SerializeToString().decode("latin-1")
    assert {h.name: h.value for h in rsp.response_init.headers}["set-cookie"] == REDACTED
    assert req.request_init.path == "/vote?user=alice"
    req, rsp, _ = _tap_events(pb.MeshConfig(tap_redact_headers=["x-api-key"], tap_redact_query=True))
    assert req.request_init.path == f"/vote?user={REDACTED}"
    assert {h.name: h.value for h in req.request_init.headers}[":path"] == f"/search?q={REDACTED}&page={REDACTED}"
    assert {h.name: h.value for h in rsp.response_init.headers}["x-api-key"] == REDACTED

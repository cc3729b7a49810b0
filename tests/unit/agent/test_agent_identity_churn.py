"""Identity looked up when used (issue 10, items 1-3 and 5), on the worker's telemetry.

Connections opened before the agent knew their peers pick the identity up for their next request;
the open-connection gauge moves with them, nothing counted moves or doubles; a reused pod IP is
never credited to the pod that held it before; a connection from an unknown local-pod address
waits (bounded) for its identity; MeshConfig from a controller is applied.
"""

from __future__ import annotations

import asyncio
import time

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.podindex import START_SLACK_MS
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS

CLIENT, SERVER, SVC = "10.244.1.5", "10.244.2.7", "10.96.0.20"
NOW_MS = int(time.time() * 1000)


def pod(ip: str, name: str, owner: str, node: str, *, uid: str | None = None, start_ms: int = NOW_MS - 60_000,
        terminating: bool = False) -> pb.Pod:
    return pb.Pod(ip=ip, namespace="shop", name=name, node=node, uid=uid or f"uid-{name}",
                  start_time_ms=start_ms, terminating=terminating, ready=True,
                  owner=pb.Resource(namespace="shop", type="deployment", name=owner))


def snapshot(*pods: pb.Pod, services: bool = True, version: int = 1, config: pb.MeshConfig | None = None,
             epoch: int = 9) -> pb.IdentitySnapshot:
    s = pb.IdentitySnapshot(resource_version=str(version), epoch=epoch, version=version,
                            captured_namespaces=["shop"])
    s.pods.extend(pods)
    if services:
        s.services.append(pb.Service(namespace="shop", name="server", cluster_ip=SVC,
                                     ports=[pb.ServicePort(port=80, target_port=8080)],
                                     endpoints=[pb.Endpoint(ip=SERVER, ready=True)]))
    if config is not None:
        s.config.CopyFrom(config)
    return s


def delta(base: int, *pods: pb.Pod, removed: tuple[str, ...] = (), epoch: int = 9) -> pb.IdentityDelta:
    d = pb.IdentityDelta(epoch=epoch, base_version=base, version=base + 1, removed_pods=list(removed))
    d.pods.extend(pods)
    return d


def tel(node: str = "node-1", **kw: object) -> WorkerTelemetry:
    return WorkerTelemetry(AgentConfig(node=node, workers=1, pod_cidrs=("10.244.1.0/24",), **kw))  # type: ignore[arg-type]


def open_conn(t: WorkerTelemetry, src: str, dst: str, *, via: str | None = None, cid: int = 1):  # type: ignore[no-untyped-def]
    meta = ConnectionMeta(cid, "outbound", (src, 40000 + cid), (via or dst, 80), (dst, 8080), "http1",
                          started=time.monotonic())
    return t.connection_open(meta)


def request(t: WorkerTelemetry, c, sid: int = 1) -> None:  # type: ignore[no-untyped-def]
    r = t.request_start(c, RequestHead("GET", "http", "server", "/", stream_id=sid, started=time.monotonic()))
    t.response_start(r, 200, [], time.monotonic())
    t.request_end(r, RequestEnd(ended=time.monotonic()))


def who(t: WorkerTelemetry) -> dict[tuple[str, str, str], int]:
    """(direction, src name, dst name) -> requests."""
    out: dict[tuple[str, str, str], int] = {}
    for key, n in t.metrics.request_total.items():
        d = dict(zip(PEER_LABELS, key))
        k = (d["direction"], d["src_name"], d["dst_name"])
        out[k] = out.get(k, 0) + n
    return out


def gauges(t: WorkerTelemetry) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for key, n in t.metrics.tcp_open_connections.items():
        d = dict(zip(PEER_LABELS, key))
        k = (d["direction"], d["src_name"], d["dst_name"])
        out[k] = out.get(k, 0) + n
    return {k: v for k, v in out.items() if v}


def test_identity_learned_after_open_applies_to_the_next_request_and_moves_the_gauge() -> None:
    t = tel()
    t.apply_identity(snapshot(services=False))  # an identity stream exists; it knows neither peer
    c = open_conn(t, CLIENT, SVC)  # dialled the ClusterIP: unknown too, so dialled as is
    request(t, c, 1)
    assert who(t) == {("outbound", CLIENT, SVC): 1}
    assert gauges(t) == {("outbound", CLIENT, SVC): 1}
    # The identity arrives: the client pod, the Service and its endpoint.
    t.apply_identity(snapshot(pod(CLIENT, "client-a", "client", "node-1"), pod(SERVER, "server-a", "server", "node-2"),
                              version=2))
    request(t, c, 2)
    assert who(t) == {("outbound", CLIENT, SVC): 1, ("outbound", "client", SVC): 1}, \
        "the first request stays where it was counted; the next is the client's"
    assert gauges(t) == {("outbound", "client", SVC): 1}, "the open connection moved with it"
    # The real endpoint behind the ClusterIP (conntrack, in the relay): the destination pod.
    t.connection_endpoint(c, (SERVER, 8080))
    request(t, c, 3)
    assert who(t)[("outbound", "client", "server")] == 1
    assert gauges(t) == {("outbound", "client", "server"): 1}
    t.connection_close(c, ConnectionEnd(10, 20, time.monotonic()))
    assert gauges(t) == {}, "opened, moved twice, closed: every gauge back at 0"
    svc = {dict(zip(PEER_LABELS, k))["dst_service"] for k in t.metrics.request_total}
    assert svc == {"", "server.shop"}


def test_a_known_peer_never_changes_while_it_holds_the_address() -> None:
    t = tel()
    t.apply_identity(snapshot(pod(CLIENT, "client-a", "client", "node-1")))
    c = open_conn(t, CLIENT, SERVER)
    request(t, c)
    # Another pod appears with the same IP while the first still claims it (terminating): the
    # connection stays the first one's.
    t.apply_identity(delta(1, pod(CLIENT, "thief-a", "thief", "node-1", uid="u2", start_ms=NOW_MS)))
    request(t, c, 2)
    assert {k[1] for k in who(t)} == {"client"}
    assert t.corrections == 0


def test_reused_ip_new_pod_is_not_credited_to_the_old_one() -> None:
    t = tel()
    old = pod(CLIENT, "old-a", "old", "node-1", start_ms=NOW_MS - 600_000)
    t.apply_identity(snapshot(old))
    a = open_conn(t, CLIENT, SERVER, cid=1)
    request(t, a)
    t.connection_close(a, ConnectionEnd(1, 1, time.monotonic()))
    # The old pod stopped (its object lingers or is gone); the controller removes it.
    t.apply_identity(delta(1, removed=("uid-old-a",)))
    # The new pod got the IP and sends before the controller knows it: unknown, never "old".
    b = open_conn(t, CLIENT, SERVER, cid=2)
    request(t, b)
    new = pod(CLIENT, "new-a", "new", "node-1", start_ms=NOW_MS - 1000)
    t.apply_identity(delta(2, new))
    request(t, b, 2)
    assert who(t) == {("outbound", "old", SERVER): 1, ("outbound", CLIENT, SERVER): 1,
                      ("outbound", "new", SERVER): 1}


def test_reused_ip_when_the_old_pod_was_still_believed_alive_is_corrected() -> None:
    # The residual race: the new pod connected while the agent still held the old pod for the
    # IP. When the new pod shows up and the old one is gone, the live connection moves (counted
    # as a correction); what was counted before stays (docs/agent-telemetry.md).
    t = tel()
    t.apply_identity(snapshot(pod(CLIENT, "old-a", "old", "node-1", start_ms=NOW_MS - 600_000)))
    c = open_conn(t, CLIENT, SERVER)
    request(t, c)
    t.apply_identity(delta(1, pod(CLIENT, "new-a", "new", "node-1", start_ms=NOW_MS - 500),
                           removed=("uid-old-a",)))
    request(t, c, 2)
    assert who(t) == {("outbound", "old", SERVER): 1, ("outbound", "new", SERVER): 1}
    assert t.corrections == 1 and t.metrics.identity_corrections == {("src",): 1}


def test_a_pod_that_started_after_the_connection_did_not_open_it() -> None:
    t = tel()
    t.apply_identity(snapshot())
    c = open_conn(t, CLIENT, SERVER)
    late = pod(CLIENT, "late-a", "late", "node-1", start_ms=int(time.time() * 1000) + 2 * START_SLACK_MS + 5000)
    t.apply_identity(delta(1, late))
    request(t, c)
    assert who(t) == {("outbound", CLIENT, SERVER): 1}


def test_same_node_rule_follows_a_destination_learned_later() -> None:
    t = tel()
    t.apply_identity(snapshot(pod(CLIENT, "client-a", "client", "node-1"), services=False))
    local = "10.244.1.9"
    c = open_conn(t, CLIENT, local)
    request(t, c)
    t.apply_identity(delta(1, pod(local, "db-a", "db", "node-1")))
    request(t, c, 2)
    t.connection_close(c, ConnectionEnd(1, 1, time.monotonic()))
    assert who(t) == {("outbound", "client", local): 1, ("outbound", "client", "db"): 1,
                      ("inbound", "client", "db"): 1}
    assert gauges(t) == {}


def test_unknown_local_pod_waits_for_identity_then_goes_on() -> None:
    async def main() -> None:
        assert tel(identity_wait_s=2.0).identity_gate(CLIENT, SERVER) is None, "no identity source: no wait"
        late = tel(identity_wait_s=2.0, controller="127.0.0.1:1")
        late._born -= 11
        assert late.identity_gate("203.0.113.9", SERVER) is None, "10 s without identity: stop holding"
        t = tel(identity_wait_s=2.0, controller="127.0.0.1:1")
        first = t.identity_gate("203.0.113.9", SERVER)
        assert first is not None, "a restarted agent holds every connection until its first identity"
        t.apply_identity(snapshot())
        assert await first == "known"
        assert t.identity_gate("10.244.9.9", SERVER) is None, "not a local pod CIDR: no wait"
        gate = t.identity_gate(CLIENT, SERVER)
        assert gate is not None and not gate.done()
        started = time.monotonic()
        asyncio.get_running_loop().call_later(0.05, t.apply_identity,
                                              delta(1, pod(CLIENT, "client-a", "client", "node-1")))
        assert await gate == "known"
        assert time.monotonic() - started < 1.0
        assert t.identity_gate(CLIENT, SERVER) is None, "known now: no wait"
        t2 = tel(identity_wait_s=0.05, identity_file="/nonexistent")
        t2.apply_identity(snapshot())
        assert await t2.identity_gate(CLIENT, SERVER) == "timeout"  # type: ignore[misc]
        assert set(t.metrics.identity_wait) == {("known",)} and set(t2.metrics.identity_wait) == {("timeout",)}
        assert sum(t.metrics.identity_wait[("known",)][:-1]) == 2
        assert sum(t2.metrics.identity_wait[("timeout",)][:-1]) == 1

    asyncio.run(main())


def test_mesh_config_from_the_controller_is_applied_not_from_a_file() -> None:
    t = tel(tap_max_rps=100.0)
    seen: list[tuple[int, ...]] = []
    t.on_mesh_config.append(lambda c: seen.append(tuple(c.opaque_ports)))
    t.apply_identity(snapshot(epoch=0, config=pb.MeshConfig(opaque_ports=[1])))  # a file: no controller
    assert seen == [] and t.taps.default_max_rps == 100.0
    t.apply_identity(snapshot(epoch=9, config=pb.MeshConfig(opaque_ports=[5432, 6379], tap_max_rps=7)))
    assert seen == [(5432, 6379)] and t.taps.default_max_rps == 7.0
    d = delta(1)
    d.config.CopyFrom(pb.MeshConfig(opaque_ports=[3306], tap_max_rps=3))
    t.apply_identity(d)
    assert seen[-1] == (3306,) and t.taps.default_max_rps == 3.0
    t.apply_identity(delta(2))  # no config in it: nothing re-applied
    assert len(seen) == 2

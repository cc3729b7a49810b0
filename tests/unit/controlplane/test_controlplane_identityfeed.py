"""Identity deltas (issue 10, item 2): the controller sends what changed, versioned; an agent that
misses or reorders a message notices and asks for the whole identity, and is never left wrong."""

from __future__ import annotations

import random

import pytest
from nodemesh.agent.podindex import IdentityGap, PodIndex
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.identityfeed import IdentityFeed


def pod(i: int, *, ip: str | None = None, owner: str = "web", ready: bool = True, node: str = "n1",
        start: int = 1000, terminating: bool = False) -> pb.Pod:
    return pb.Pod(ip=ip or f"10.1.{i // 250}.{i % 250 + 2}", namespace="ns", name=f"{owner}-{i}", node=node,
                  uid=f"uid-{i}", ready=ready, start_time_ms=start, terminating=terminating,
                  owner=pb.Resource(namespace="ns", type="deployment", name=owner))


def service(name: str, ip: str, endpoints: list[pb.Pod]) -> pb.Service:
    return pb.Service(namespace="ns", name=name, cluster_ip=ip,
                      ports=[pb.ServicePort(name="http", port=80, target_port=8080)],
                      endpoints=[pb.Endpoint(ip=p.ip, ready=p.ready, pod=p.name) for p in endpoints])


def snap(pods: list[pb.Pod], services: list[pb.Service] = (), namespaces: tuple[str, ...] = ("ns",),
         opaque: tuple[int, ...] = (3306,)) -> pb.IdentitySnapshot:
    s = pb.IdentitySnapshot(resource_version="1", captured_namespaces=namespaces)
    s.pods.extend(pods)
    s.services.extend(services)
    s.config.opaque_ports.extend(opaque)
    return s


def same_view(a: PodIndex, b: PodIndex) -> bool:
    return (a.known_uids() == b.known_uids()
            and {ip: a.peer_labels(ip) for ip in a.known_uids()} == {ip: b.peer_labels(ip) for ip in b.known_uids()}
            and a._by_cluster_ip == b._by_cluster_ip and a.captured_namespaces == b.captured_namespaces
            and a.config == b.config)


def test_a_change_is_one_small_delta_on_top_of_the_snapshot() -> None:
    feed = IdentityFeed(epoch=7)
    pods = [pod(i) for i in range(5000)]
    assert feed.update(snap(pods, [service("web", "10.96.0.10", pods[:3])]))
    first = feed.message_for(0, 0)
    assert first is not None and first.HasField("identity") and len(first.identity.pods) == 5000
    assert (first.identity.epoch, first.identity.version) == (7, 1)
    assert not feed.update(snap(pods, [service("web", "10.96.0.10", pods[:3])])), "no change, no version"
    pods.append(pod(5000, owner="new"))
    pods[3] = pod(3, ready=False)
    assert feed.update(snap(pods, [service("web", "10.96.0.10", pods[:4])]))
    msg = feed.message_for(7, 1)
    assert msg is not None and msg.HasField("identity_delta")
    delta = msg.identity_delta
    assert (delta.base_version, delta.version) == (1, 2)
    assert sorted(p.name for p in delta.pods) == ["new-5000", "web-3"] and [s.name for s in delta.services] == ["web"]
    assert len(msg.SerializeToString()) < len(first.SerializeToString()) / 500
    assert feed.message_for(7, 2) is None


def test_agent_applies_deltas_and_converges_with_a_full_snapshot() -> None:
    rng = random.Random(10)
    feed = IdentityFeed(epoch=3)
    pods = {i: pod(i) for i in range(60)}
    services = {"a": service("a", "10.96.0.10", list(pods.values())[:5])}
    feed.update(snap(list(pods.values()), list(services.values())))
    agent = PodIndex("n1")
    agent.update(feed.message_for(0, 0))  # type: ignore[arg-type]
    next_id = 60
    for step in range(200):
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.3 and pods:
                del pods[rng.choice(list(pods))]
            elif op < 0.6:
                pods[next_id] = pod(next_id, owner=rng.choice(["web", "api"]), node=rng.choice(["n1", "n2"]))
                next_id += 1
            elif op < 0.8 and pods:
                k = rng.choice(list(pods))
                pods[k] = pod(k, ready=not pods[k].ready, owner=pods[k].owner.name, node=pods[k].node)
            else:
                services[rng.choice("abc")] = service("x", f"10.96.0.{rng.randint(10, 12)}",
                                                      rng.sample(list(pods.values()), min(3, len(pods))))
        namespaces = ("ns",) if step % 50 else ("ns", "other")
        feed.update(snap(list(pods.values()), list(services.values()), namespaces=namespaces,
                         opaque=(3306,) if step % 70 else (5432,)))
        if rng.random() < 0.7:  # some agents are a few versions behind when their turn comes
            msg = feed.message_for(agent.epoch, agent.version)
            if msg is not None:
                agent.update(msg)
    msg = feed.message_for(agent.epoch, agent.version)
    if msg is not None:
        agent.update(msg)
    whole = PodIndex("n1")
    whole.update(feed.snapshot())
    assert (agent.epoch, agent.version) == (whole.epoch, whole.version) == (3, feed.version)
    assert same_view(agent, whole)


def test_gaps_and_other_epochs_are_refused_then_repaired_by_a_snapshot() -> None:
    feed = IdentityFeed(epoch=5, history=3)
    pods = [pod(i) for i in range(3)]
    feed.update(snap(pods))
    agent = PodIndex("n1")
    agent.update(feed.message_for(0, 0))  # type: ignore[arg-type]
    v1 = agent.version
    for i in range(3, 6):
        pods.append(pod(i))
        feed.update(snap(pods))
    lost = feed.message_for(5, v1)  # composed delta v1 -> v4
    assert lost is not None and lost.HasField("identity_delta")
    pods.append(pod(6))
    feed.update(snap(pods))
    later = feed.message_for(5, v1 + 3)  # a delta on top of a version the agent never got
    with pytest.raises(IdentityGap):
        agent.update(later)  # type: ignore[arg-type]
    assert agent.version == v1 and len(agent) == 3, "a refused delta changes nothing"
    # A restarted controller's epoch: never applied on top of the old one's versions.
    other = IdentityFeed(epoch=6)
    other.update(snap(pods))
    other.update(snap([*pods, pod(9)]))
    with pytest.raises(IdentityGap):
        agent.update(other.delta_since(1))  # type: ignore[arg-type]
    # The agent's resync: a whole snapshot, whatever it held. History too short: a snapshot too.
    assert feed.message_for(5, v1).HasField("identity")  # type: ignore[union-attr]
    agent.update(feed.message_for(0, 0))  # type: ignore[arg-type]
    assert len(agent) == 7 and agent.version == feed.version


def test_removed_pods_and_services_go_away_on_the_agent() -> None:
    feed = IdentityFeed(epoch=1)
    a, b = pod(1), pod(2)
    feed.update(snap([a, b], [service("s", "10.96.0.10", [a, b])]))
    agent = PodIndex("n1")
    agent.update(feed.message_for(0, 0))  # type: ignore[arg-type]
    assert agent.service_endpoints("10.96.0.10", 80) == [(a.ip, 8080), (b.ip, 8080)]
    feed.update(snap([a]))
    changes = agent.update(feed.message_for(1, agent.version))  # type: ignore[arg-type]
    assert agent.owner(b.ip) is None and agent.service_endpoints("10.96.0.10", 80) is None
    assert changes.ips == {b.ip} and changes.cluster_ips == {"10.96.0.10"}

"""Owner resolution, services/endpoints and the identity snapshot, from recorded API objects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import WorkloadRef
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"


@pytest.fixture
def objects() -> list[dict]:
    return json.loads(TESTDATA.read_text())["items"]


@pytest.fixture
def registry(objects: list[dict]) -> WorkloadRegistry:
    reg = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    return reg


def test_owner_resolution_every_kind(registry: WorkloadRegistry) -> None:
    owners = {p.name: p.workload for p in registry.pods()}
    assert owners["web-5f7c9d8b6-x2vqm"] == WorkloadRef("emojivoto", "deployment", "web")
    assert owners["emoji-6b8f4c7d9-q9z4t"] == WorkloadRef("emojivoto", "deployment", "emoji")
    assert owners["db-0"] == WorkloadRef("emojivoto", "statefulset", "db")
    assert owners["logger-7xk2d"] == WorkloadRef("emojivoto", "daemonset", "logger")
    assert owners["migrate-x7k2p"] == WorkloadRef("emojivoto", "job", "migrate")
    assert owners["debug"] == WorkloadRef("emojivoto", "pod", "debug")
    assert registry.pod("emojivoto", "web-5f7c9d8b6-x2vqm").replicaset == "web-5f7c9d8b6"


def test_owner_without_replicaset_yet_uses_pod_template_hash(objects: list[dict]) -> None:
    reg = WorkloadRegistry()
    reg.replace("Pod", [copy.deepcopy(o) for o in objects if o["kind"] == "Pod"])
    assert reg.pod("emojivoto", "voting-74d9c8f6b5-h6wnb").workload == WorkloadRef("emojivoto", "deployment",
                                                                                  "voting")


def test_replicaset_without_owner_is_the_workload(objects: list[dict]) -> None:
    reg = WorkloadRegistry()
    rs = copy.deepcopy(next(o for o in objects if o["metadata"]["name"] == "web-5f7c9d8b6"))
    del rs["metadata"]["ownerReferences"]
    pod = copy.deepcopy(next(o for o in objects if o["metadata"]["name"] == "web-5f7c9d8b6-x2vqm"))
    reg.apply("ADDED", rs)
    reg.apply("ADDED", pod)
    assert reg.pod("emojivoto", pod["metadata"]["name"]).workload == WorkloadRef("emojivoto", "replicaset",
                                                                                  "web-5f7c9d8b6")


def test_workload_resources_have_their_pods(registry: WorkloadRegistry) -> None:
    deploys = {r.name: sorted(p.name for p in r.pods) for r in registry.resources("deployment", "emojivoto")}
    assert deploys == {
        "emoji": ["emoji-6b8f4c7d9-k8s7p", "emoji-6b8f4c7d9-q9z4t"], "vote-bot": ["vote-bot-7c4d8b5f9-p2lkd"],
        "voting": ["voting-74d9c8f6b5-h6wnb"], "web": ["web-5f7c9d8b6-x2vqm"],
    }
    assert [r.name for r in registry.resources("deployment", None)] == ["emoji", "vote-bot", "voting", "web", "old"]
    assert [p.name for p in registry.resource("replicaset", "emojivoto", "emoji-6b8f4c7d9").pods] == [
        "emoji-6b8f4c7d9-k8s7p", "emoji-6b8f4c7d9-q9z4t"]
    assert registry.resource("service", "emojivoto", "voting-svc").pods[0].name == "voting-74d9c8f6b5-h6wnb"


def test_services_endpoints_and_named_target_port(registry: WorkloadRegistry) -> None:
    svcs = {s.name: s for s in registry.services()}
    web = svcs["web-svc"]
    assert web.cluster_ip == "10.96.0.10"
    assert web.ports == [("http", 80, 8080)]  # "http" resolved through the EndpointSlice
    emoji = svcs["emoji-svc"]
    assert [(e.ip, e.ready, e.pod, e.node) for e in emoji.endpoints] == [
        ("10.244.1.6", True, "emoji-6b8f4c7d9-k8s7p", "node-1"),
        ("10.244.2.7", False, "emoji-6b8f4c7d9-q9z4t", "node-2"),
    ]


def test_endpoints_from_selector_when_no_endpointslices(objects: list[dict]) -> None:
    reg = WorkloadRegistry()
    for kind in ("Pod", "Service"):
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    web = next(s for s in reg.services() if s.name == "web-svc")
    assert [(e.ip, e.pod) for e in web.endpoints] == [("10.244.1.5", "web-5f7c9d8b6-x2vqm")]
    assert web.ports == [("http", 80, 8080)]  # named port resolved from the pod's container ports


def test_identity_snapshot(registry: WorkloadRegistry) -> None:
    config = pb.MeshConfig(opaque_ports=[5432], excluded_namespaces=["kube-system"], tap_max_rps=50)
    snap = registry.identity_snapshot(config)
    ips = {p.ip: p for p in snap.pods}
    assert "10.244.1.12" not in ips  # the finished job pod may have handed its IP on
    web = ips["10.244.1.5"]
    assert (web.namespace, web.name, web.node, web.ready) == ("emojivoto", "web-5f7c9d8b6-x2vqm", "node-1", True)
    assert (web.owner.type, web.owner.name) == ("deployment", "web")
    assert {s.name for s in snap.services} == {"web-svc", "emoji-svc", "voting-svc"}
    assert list(snap.config.opaque_ports) == [5432]
    # legacy is labelled nodemesh.io/capture=disabled; kube-system is excluded by config.
    assert list(snap.captured_namespaces) == ["default", "emojivoto"]


def test_events_add_modify_delete_and_listeners(registry: WorkloadRegistry, objects: list[dict]) -> None:
    calls = []
    registry.add_listener(lambda: calls.append(registry.version))
    pod = copy.deepcopy(next(o for o in objects if o["metadata"]["name"] == "debug"))
    registry.apply("MODIFIED", copy.deepcopy(pod))  # identical: no change, no callback
    assert calls == []
    pod["metadata"]["resourceVersion"] = "5000"
    pod["status"]["podIP"] = "10.244.2.99"
    registry.apply("MODIFIED", pod)
    assert registry.pod("emojivoto", "debug").ip == "10.244.2.99"
    registry.apply("DELETED", pod)
    assert registry.pod("emojivoto", "debug") is None
    assert len(calls) == 2
    registry.replace("Pod", [])
    assert registry.pods() == []


def test_incremental_derivation_follows_the_pod_and_its_replicaset(objects: list[dict]) -> None:
    """Records are rebuilt only for pods whose object or ReplicaSet changed (a 50,000-pod cluster
    re-derived every pod on every change), and every change still shows: a pod's status, and an
    owner change that only its ReplicaSet says."""
    reg = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    name = "web-5f7c9d8b6-x2vqm"
    before = {p.name: p for p in reg.pods()}
    entries = dict(reg.identity_entries(pb.MeshConfig()).pods)   # the registry's dict goes on changing
    pod = copy.deepcopy(reg.get("Pod", "emojivoto", name))
    pod["metadata"]["resourceVersion"] = "999"
    pod["metadata"]["labels"]["extra"] = "1"
    reg.apply("MODIFIED", pod)
    after = {p.name: p for p in reg.pods()}
    assert after[name] is not before[name] and after[name].labels["extra"] == "1"
    assert all(after[n] is before[n] for n in before if n != name)   # the others: the same records
    again = reg.identity_entries(pb.MeshConfig())
    uid = after[name].uid
    assert again.pods[uid] != entries[uid]
    assert all(again.pods[u] is entries[u] for u in entries if u != uid)   # not re-serialized
    assert again.pods == reg_from_scratch(reg).identity_entries(pb.MeshConfig()).pods
    # The ReplicaSet loses its Deployment owner: the pod (unchanged) now belongs to the ReplicaSet.
    rs = copy.deepcopy(reg.get("ReplicaSet", "emojivoto", "web-5f7c9d8b6"))
    del rs["metadata"]["ownerReferences"]
    rs["metadata"]["resourceVersion"] = "1000"
    reg.apply("MODIFIED", rs)
    assert reg.pod("emojivoto", name).workload == WorkloadRef("emojivoto", "replicaset", "web-5f7c9d8b6")
    assert [(p.name, p.workload) for p in reg.pods()] == [(p.name, p.workload) for p in reg_from_scratch(reg).pods()]


def reg_from_scratch(reg: WorkloadRegistry) -> WorkloadRegistry:
    fresh = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        fresh.replace(kind, [copy.deepcopy(o) for o in reg.objects(kind)])
    return fresh

"""PodIndex and identity conversion from recorded cluster objects (the sandbox's objects.json shape)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nodemesh.agent.identity import IdentityFileSource, snapshot_from_objects
from nodemesh.agent.podindex import PodIndex
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb


def pod(name: str, ns: str, ip: str, node: str, *, owner: tuple[str, str] | None = None,
        labels: dict[str, str] | None = None, ready: bool = True, host_network: bool = False,
        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True}]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "c", "ports": ports or []}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def replicaset(name: str, ns: str, deploy: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if deploy:
        meta["ownerReferences"] = [{"kind": "Deployment", "name": deploy, "controller": True}]
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta}


def service(name: str, ns: str, cluster_ip: str, ports: list[dict[str, Any]],
            selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": cluster_ip, "ports": ports, "selector": selector or {}}}


def endpointslice(svc: str, ns: str, endpoints: list[tuple[str, bool, str]],
                  ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-abc", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "ports": ports,
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node,
                       "targetRef": {"kind": "Pod", "name": f"p-{ip}"}} for ip, ready, node in endpoints],
    }


def namespace(name: str, disabled: bool = False, via: str = "labels") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if disabled:
        meta[via] = {"nodemesh.io/capture": "disabled"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def cluster() -> ClusterObjects:
    items = [
        namespace("emojivoto"), namespace("kube-system", disabled=True),
        namespace("legacy", disabled=True, via="annotations"),
        replicaset("web-6d9f7c", "emojivoto", "web"),
        replicaset("orphan-rs", "emojivoto", None),
        pod("web-6d9f7c-aaaaa", "emojivoto", "10.244.1.5", "node-1", owner=("ReplicaSet", "web-6d9f7c"),
            labels={"app": "web", "pod-template-hash": "6d9f7c"}),
        # Its ReplicaSet was never recorded: resolved through pod-template-hash.
        pod("emoji-5c7b8d-bbbbb", "emojivoto", "10.244.2.7", "node-2", owner=("ReplicaSet", "emoji-5c7b8d"),
            labels={"app": "emoji", "pod-template-hash": "5c7b8d"}),
        pod("voting-0", "emojivoto", "10.244.1.9", "node-1", owner=("StatefulSet", "voting"),
            labels={"app": "voting"}, ports=[{"name": "grpc", "containerPort": 8080}]),
        pod("voting-1", "emojivoto", "10.244.2.9", "node-2", owner=("StatefulSet", "voting"),
            labels={"app": "voting"}, ready=False, ports=[{"name": "grpc", "containerPort": 8080}]),
        pod("lonely", "emojivoto", "10.244.1.11", "node-1", owner=("ReplicaSet", "orphan-rs")),
        pod("bare", "emojivoto", "10.244.1.12", "node-1"),
        pod("coredns-x", "kube-system", "10.244.1.20", "node-1", owner=("DaemonSet", "coredns")),
        pod("old-app", "legacy", "10.244.1.21", "node-1", owner=("Job", "migrate")),
        pod("old-remote", "legacy", "10.244.2.21", "node-2"),
        pod("hostnet", "kube-system", "192.168.50.1", "node-1", host_network=True),
        service("web-svc", "emojivoto", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 8080}]),
        endpointslice("web-svc", "emojivoto", [("10.244.1.5", True, "node-1"), ("10.244.3.3", False, "node-3")],
                      [{"name": "http", "port": 8080}]),
        # Named targetPort, no endpoint objects: endpoints from the selector, port from the pods.
        service("voting-svc", "emojivoto", "10.96.0.11", [{"name": "grpc", "port": 8080, "targetPort": "grpc"}],
                selector={"app": "voting"}),
        service("headless", "emojivoto", "None", [{"port": 80}], selector={"app": "web"}),
    ]
    return ClusterObjects(7, items)


def test_owner_resolution_and_unknown_ips() -> None:
    idx = PodIndex("node-1")
    idx.update(cluster())
    web = idx.owner("10.244.1.5")
    assert web is not None and (web.identity.workload.kind, web.identity.workload.name, web.identity.pod) == (
        "deployment", "web", "web-6d9f7c-aaaaa")
    assert idx.peer_labels("10.244.2.7") == ("emojivoto", "deployment", "emoji", "emoji-5c7b8d-bbbbb")
    assert idx.peer_labels("10.244.1.9")[1:3] == ("statefulset", "voting")
    assert idx.peer_labels("10.244.1.11")[1:3] == ("replicaset", "orphan-rs")
    assert idx.peer_labels("10.244.1.12")[1:3] == ("pod", "bare")
    assert idx.peer_labels("10.244.1.20")[1:3] == ("daemonset", "coredns")
    assert idx.peer_labels("10.244.1.21")[1:3] == ("job", "migrate")
    # Host-network pods don't claim their node's address; unknown IPs are labelled by address.
    assert idx.owner("192.168.50.1") is None
    assert idx.peer_labels("192.168.50.1") == ("", "unknown", "192.168.50.1", "")
    assert idx.resource_version == "7"


def test_service_endpoints_ready_only_with_target_ports() -> None:
    idx = PodIndex("node-1")
    idx.update(cluster())
    assert idx.service_endpoints("10.96.0.10", 80) == [("10.244.1.5", 8080)]
    assert idx.service_of("10.96.0.10", 80) == "web-svc.emojivoto"
    # Named targetPort resolved through the pods' container ports; the unready pod is left out.
    assert idx.service_endpoints("10.96.0.11", 8080) == [("10.244.1.9", 8080)]
    assert idx.service_endpoints("10.96.0.10", 81) is None  # a known IP but not a known port
    assert idx.service_endpoints("10.244.1.5", 8080) is None  # a pod IP is not a ClusterIP
    assert idx.service_of("10.244.1.5", 8080) == ""


def test_local_pods_and_capture_exclusions() -> None:
    idx = PodIndex("node-1")
    idx.update(cluster())
    assert idx.is_local_pod("10.244.1.5") and not idx.is_local_pod("10.244.2.7")
    assert not idx.is_local_pod("192.168.50.1")
    assert idx.excluded_namespaces == {"kube-system", "legacy"}
    # Only THIS node's pods in excluded namespaces (by label or by annotation).
    assert idx.local_excluded_ips() == ["10.244.1.20", "10.244.1.21"]


def test_update_from_snapshot_bytes_replaces_everything() -> None:
    idx = PodIndex("node-2")
    idx.update(snapshot_from_objects(cluster()).SerializeToString())
    assert idx.is_local_pod("10.244.2.7") and len(idx) == 9
    snap = pb.IdentitySnapshot(resource_version="8")
    snap.pods.append(pb.Pod(ip="10.244.2.50", namespace="a", name="p", node="node-2",
                            owner=pb.Resource(namespace="a", type="deployment", name="d")))
    idx.update(snap)
    assert idx.owner("10.244.2.7") is None and idx.service_of("10.96.0.10", 80) == ""
    assert idx.peer_labels("10.244.2.50") == ("a", "deployment", "d", "p")


def test_identity_file_source_reloads_on_change(tmp_path: Path) -> None:
    seen: list[pb.IdentitySnapshot] = []
    src = IdentityFileSource(str(tmp_path), seen.append, poll_s=0.05)
    assert src.load_once() is False  # no file yet: nothing, no error
    objs = cluster()
    write_objects(tmp_path, objs)
    assert src.load_once() is True and seen[-1].resource_version == "7"
    assert src.load_once() is False  # unchanged
    objs.resource_version = 9
    objs.items.append(pod("new", "emojivoto", "10.244.1.99", "node-1"))
    write_objects(tmp_path, objs)
    os.utime(tmp_path / "objects.json", ns=(1, 1))  # a different mtime even within one tick
    assert src.load_once() is True
    assert seen[-1].resource_version == "9"
    assert any(p.ip == "10.244.1.99" for p in seen[-1].pods)
    # A broken file is skipped, keeping the last good snapshot.
    (tmp_path / "objects.json").write_text("{not json")
    assert src.load_once() is False and len(seen) == 2

"""PodIndex and identity conversion from recorded cluster objects (the sandbox's objects.json shape)."""

from __future__ import annotations

import os
from pathlib import Path

from clusterobjects import cluster, pod
from nodemesh.agent.identity import IdentityFileSource, snapshot_from_objects
from nodemesh.agent.podindex import PodIndex
from nodemesh.api.clusterstate import write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb


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

"""Recorded Kubernetes objects (the sandbox's objects.json shape) for identity tests: pods,
ReplicaSets, Services, EndpointSlices, Namespaces, and `cluster()`, one small cluster of them.
Used by the agent's pod index unit tests and by the integration tests that feed a real agent."""

from __future__ import annotations

from typing import Any

from nodemesh.api.clusterstate import ClusterObjects


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

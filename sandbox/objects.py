"""Kubernetes objects as the API server would return them, built from manifests and pod status.

Pure functions over dicts: the Deployment -> ReplicaSet -> Pod chain with ownerReferences and
pod-template-hash, Services with a ClusterIP, EndpointSlices (discovery.k8s.io/v1), Nodes and
Namespaces. `derive(objs)` recomputes what controllers would (ReplicaSet/Deployment status,
EndpointSlices) from the pods and services; the store only bumps objects that really changed.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from nodemesh.sandbox import naming
from nodemesh.sandbox.manifests import resolve_container_port
from nodemesh.sandbox.netlink import NodeInfo
from nodemesh.sandbox.state import Objects, now_rfc3339

API_SERVER_NAMESPACE = "kube-system"


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }


def namespace_object(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {**(labels or {}), "kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def node_object(node: NodeInfo) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
            },
            "annotations": {"sandbox.nodemesh.io/netns": node.netns, "sandbox.nodemesh.io/cni": node.cni},
        },
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node.ip}, {"type": "Hostname", "address": node.name}],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "sandbox node is ready",
            }],
        },
    }


def deployment_object(manifest: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    obj = copy.deepcopy(manifest)
    meta = obj["metadata"]
    meta.pop("resourceVersion", None)
    meta.pop("uid", None)
    spec = obj["spec"]
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    spec.setdefault("strategy", {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    generation = 1
    if existing is not None:
        generation = existing["metadata"].get("generation", 1)
        if existing["spec"] != spec:
            generation += 1
        obj["status"] = existing.get("status", {})
    meta["generation"] = generation
    meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
    obj.setdefault("status", {})
    return obj


def pod_template_hash(deploy: dict[str, Any]) -> str:
    return naming.template_hash(deploy["spec"]["template"])


def replicaset_object(deploy: dict[str, Any], tmpl_hash: str) -> dict[str, Any]:
    name = f"{deploy['metadata']['name']}-{tmpl_hash}"
    template = copy.deepcopy(deploy["spec"]["template"])
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), "pod-template-hash": tmpl_hash}
    selector = {**deploy["spec"]["selector"]["matchLabels"], "pod-template-hash": tmpl_hash}
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": name, "namespace": deploy["metadata"]["namespace"],
            "labels": dict(tmeta["labels"]),
            "annotations": {"deployment.kubernetes.io/desired-replicas": str(deploy["spec"]["replicas"]),
                            "deployment.kubernetes.io/revision": "1"},
            "ownerReferences": [owner_ref(deploy)],
        },
        "spec": {"replicas": deploy["spec"]["replicas"], "selector": {"matchLabels": selector},
                 "template": template},
        "status": {"replicas": 0, "observedGeneration": 1},
    }


def pod_object(rs: dict[str, Any], name: str, node: NodeInfo, ip: str) -> dict[str, Any]:
    """A Pod of a ReplicaSet (or of any owner whose spec.template it follows)."""
    return pod_from_template(rs, rs["spec"]["template"], name, node, ip)


def pod_from_template(owner: dict[str, Any], template: dict[str, Any], name: str, node: NodeInfo, ip: str,
                      extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(template["spec"])
    spec["nodeName"] = node.name
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    # No default terminationGracePeriodSeconds (Kubernetes: 30): the sandbox kubelet gives a pod
    # that does not ask for one 3 s, so tests stop quickly; an explicit one is honoured.
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("schedulerName", "default-scheduler")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        c.setdefault("image", "sandbox/process")
        c.setdefault("imagePullPolicy", "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
    meta = template.get("metadata") or {}
    annotations = dict(meta.get("annotations") or {})
    if spec.get("hostNetwork"):
        ip = node.ip  # a hostNetwork pod's IP is its node's
    delayed = STATUS_DELAY_ANNOTATION in annotations and not spec.get("hostNetwork")
    if delayed:
        annotations[ASSIGNED_IP_ANNOTATION] = ip
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "generateName": f"{owner['metadata']['name']}-",
            "namespace": owner["metadata"]["namespace"],
            "labels": {**(meta.get("labels") or {}), **(extra_labels or {})},
            "annotations": annotations,
            "ownerReferences": [owner_ref(owner)],
        },
        "spec": spec,
        "status": {
            "phase": "Pending", "hostIP": node.ip, "hostIPs": [{"ip": node.ip}],
            "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()},
            ],
            "containerStatuses": [
                {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "started": False,
                 "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}}
                for c in spec["containers"]
            ],
            **({"initContainerStatuses": [
                {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "PodInitializing"}}, "lastState": {}}
                for c in spec["initContainers"]
            ]} if spec.get("initContainers") else {}),
        },
    }
    if delayed:
        pod["status"]["podIP"], pod["status"]["podIPs"] = "", []
    return pod


def daemonset_object(manifest: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    obj = copy.deepcopy(manifest)
    meta = obj["metadata"]
    meta.pop("resourceVersion", None)
    meta.pop("uid", None)
    spec = obj["spec"]
    spec.setdefault("revisionHistoryLimit", 10)
    strategy = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
    if strategy.get("type", "RollingUpdate") == "RollingUpdate":
        rolling = strategy.setdefault("rollingUpdate", {})
        rolling.setdefault("maxSurge", 0)
        rolling.setdefault("maxUnavailable", 1)
    generation = 1
    if existing is not None:
        generation = existing["metadata"].get("generation", 1)
        if existing["spec"] != spec:
            generation += 1
        obj["status"] = existing.get("status", {})
    meta["generation"] = generation
    obj.setdefault("status", {})
    return obj


def daemonset_pod(ds: dict[str, Any], name: str, node: NodeInfo, ip: str) -> dict[str, Any]:
    template = ds["spec"]["template"]
    return pod_from_template(ds, template, name, node, ip, {
        "controller-revision-hash": naming.template_hash(template),
        "pod-template-generation": str(ds["metadata"].get("generation", 1)),
    })


def recorded_object(manifest: dict[str, Any]) -> dict[str, Any]:
    """ConfigMap, ServiceAccount, ClusterRole, ClusterRoleBinding: stored as given."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].pop("resourceVersion", None)
    obj["metadata"].pop("uid", None)
    return obj


def node_matches(node: dict[str, Any] | None, node_selector: dict[str, str] | None) -> bool:
    """Does a Node object carry every label of a pod's nodeSelector?"""
    labels = ((node or {}).get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (node_selector or {}).items())


def service_object(manifest: dict[str, Any], cluster_ip: str) -> dict[str, Any]:
    obj = copy.deepcopy(manifest)
    obj["metadata"].pop("resourceVersion", None)
    obj["metadata"].pop("uid", None)
    spec = obj["spec"]
    spec["clusterIP"] = cluster_ip
    spec["clusterIPs"] = [cluster_ip]
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    obj["status"] = {"loadBalancer": {}}
    return obj


# Test hooks (sandbox/lifecycle.py, docs/sandbox.md "Pod lifecycle"): a pod template annotated
# POD_IP_ANNOTATION gets that IP (on the node whose pod CIDR holds it: forced IP reuse); one annotated
# STATUS_DELAY_ANNOTATION (seconds) has its IP recorded in ASSIGNED_IP_ANNOTATION only, and in
# status.podIP once its container has run that long (the status write that lags the pod's start on
# a real node). STOP_AT_ANNOTATION (epoch seconds) on a terminating pod is when the kubelet stops
# its containers (a preStop hook's wait).
POD_IP_ANNOTATION = "sandbox.nodemesh.io/pod-ip"
STATUS_DELAY_ANNOTATION = "sandbox.nodemesh.io/status-delay-s"
ASSIGNED_IP_ANNOTATION = "sandbox.nodemesh.io/assigned-ip"
STOP_AT_ANNOTATION = "sandbox.nodemesh.io/stop-at"
# Set once a terminating pod's network is torn down (CNI DEL): its IP may be given to a new pod
# while the object still lingers, as on a real node.
IP_RELEASED_ANNOTATION = "sandbox.nodemesh.io/ip-released"


def pod_ip(pod: dict[str, Any]) -> str:
    """The IP the pod holds, recorded in its status or (status write pending) in its annotation;
    "" once a terminating pod's network was torn down."""
    annotations = pod["metadata"].get("annotations") or {}
    if annotations.get(IP_RELEASED_ANNOTATION):
        return ""
    return pod["status"].get("podIP") or annotations.get(ASSIGNED_IP_ANNOTATION, "")


def pod_ready(pod: dict[str, Any]) -> bool:
    for c in pod.get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return bool(c["status"] == "True")
    return False


def selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def _target_port(pod: dict[str, Any], target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    for c in pod["spec"]["containers"]:
        port = resolve_container_port(c, target)
        if port is not None:
            return port
    return None


def endpointslice_object(svc: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
    meta = svc["metadata"]
    suffix = hashlib.sha1(meta["uid"].encode()).hexdigest()[:5]
    selected = [p for p in pods if selects(svc["spec"].get("selector"), p["metadata"].get("labels") or {})
                and p["status"].get("podIP") and p["status"].get("phase") != "Succeeded"]
    selected.sort(key=lambda p: p["metadata"]["name"])
    ports = []
    for sp in svc["spec"]["ports"]:
        number = next((n for p in selected if (n := _target_port(p, sp["targetPort"])) is not None), None)
        if number is None:
            continue  # no pod, or a named targetPort no pod defines: no endpoint port
        ports.append({"name": sp.get("name", ""), "port": number, "protocol": sp.get("protocol", "TCP")})
    endpoints = [{
        "addresses": [p["status"]["podIP"]],
        # A terminating pod is never ready for new connections (the endpoint controller's rule).
        "conditions": {"ready": pod_ready(p) and not p["metadata"].get("deletionTimestamp"),
                       "serving": pod_ready(p), "terminating": bool(p["metadata"].get("deletionTimestamp"))},
        "nodeName": p["spec"]["nodeName"],
        "targetRef": {"kind": "Pod", "namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"],
                      "uid": p["metadata"]["uid"]},
    } for p in selected]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": f"{meta['name']}-{suffix}", "namespace": meta["namespace"],
            "generateName": f"{meta['name']}-",
            "labels": {"kubernetes.io/service-name": meta["name"],
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [owner_ref(svc)],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


def derive(objs: Objects) -> None:
    """Recompute controller-owned state: ReplicaSet/Deployment status and EndpointSlices."""
    pods = objs.list("Pod")
    for rs in objs.list("ReplicaSet"):
        mine = [p for p in pods if p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]]
        ready = sum(1 for p in mine if pod_ready(p))
        new = copy.deepcopy(rs)
        new["status"] = {"replicas": len(mine), "fullyLabeledReplicas": len(mine), "readyReplicas": ready,
                         "availableReplicas": ready, "observedGeneration": 1}
        objs.put(new)
    for dep in objs.list("Deployment"):
        rss = [r for r in objs.list("ReplicaSet", dep["metadata"]["namespace"])
               if r["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]]
        total = sum(r["status"].get("replicas", 0) for r in rss)
        ready = sum(r["status"].get("readyReplicas", 0) for r in rss)
        want = dep["spec"]["replicas"]
        new = copy.deepcopy(dep)
        new["status"] = {
            "observedGeneration": dep["metadata"].get("generation", 1), "replicas": total,
            "updatedReplicas": total, "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": max(0, want - ready),
            "conditions": [{"type": "Available", "status": "True" if ready >= want else "False",
                            "reason": "MinimumReplicasAvailable" if ready >= want
                            else "MinimumReplicasUnavailable"}],
        }
        objs.put(new)
    nodes = objs.list("Node")
    for ds in objs.list("DaemonSet"):
        mine = [p for p in pods if p["metadata"]["ownerReferences"][0]["uid"] == ds["metadata"]["uid"]]
        current = naming.template_hash(ds["spec"]["template"])
        selector = ds["spec"]["template"]["spec"].get("nodeSelector")
        desired = sum(1 for n in nodes if node_matches(n, selector))
        updated = [p for p in mine if p["metadata"]["labels"].get("controller-revision-hash") == current]
        ready_nodes = {p["spec"]["nodeName"] for p in mine if pod_ready(p)}
        new = copy.deepcopy(ds)
        new["status"] = {
            "observedGeneration": ds["metadata"].get("generation", 1),
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": len({p["spec"]["nodeName"] for p in mine}),
            "numberMisscheduled": 0,
            "numberReady": len(ready_nodes),
            "numberAvailable": len(ready_nodes),
            "numberUnavailable": max(0, desired - len(ready_nodes)),
            "updatedNumberScheduled": len({p["spec"]["nodeName"] for p in updated}),
        }
        objs.put(new)
    wanted: set[tuple[str, str]] = set()
    for svc in objs.list("Service"):
        ns = svc["metadata"]["namespace"]
        # The API server writes the endpoints of default/kubernetes itself (the Service has no
        # selector); the sandbox's API server is a pod of kube-system, selected across namespaces.
        pods_ns = API_SERVER_NAMESPACE if (ns, svc["metadata"]["name"]) == ("default", "kubernetes") else ns
        eps = endpointslice_object(svc, [p for p in pods if p["metadata"]["namespace"] == pods_ns])
        wanted.add((ns, eps["metadata"]["name"]))
        objs.put(eps)
    for eps in objs.list("EndpointSlice"):
        key = (eps["metadata"]["namespace"], eps["metadata"]["name"])
        if key not in wanted:
            objs.delete("EndpointSlice", *key)

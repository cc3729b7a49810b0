"""Pods leaving the way they leave a real node: graceful termination, rolling updates, scale-down.

`Sandbox.apply` replaces or removes pods at once (objects first, processes right after), which is
fine for setting a cluster up but not for watching a mesh through churn. Here the order is
Kubernetes':

1. the pod gets a `deletionTimestamp`: it is Terminating, its endpoints stop being ready (agents
   and kube-proxy stop sending it new connections), its containers keep running for `pre_stop_s`
   (a preStop hook's wait);
2. the kubelet stops its containers (SIGTERM, then SIGKILL after the grace) and records them
   terminated;
3. the network goes (CNI DEL): the pod's IP is free for a new pod from here on, while
4. the object lingers `linger_s` more before it is removed.

`rollout` is a rolling update with maxSurge 100 %, maxUnavailable 0: the new ReplicaSet's pods
are created and must be Ready before the old ones are terminated as above.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nodemesh.sandbox import objects
from nodemesh.sandbox.state import now_rfc3339

if TYPE_CHECKING:
    from nodemesh.sandbox.cluster import Sandbox

PodKey = tuple[str, str]  # (namespace, name)


def _containers_terminated(pod: dict[str, Any]) -> bool:
    return all("terminated" in (cs.get("state") or {}) for cs in pod["status"].get("containerStatuses", []))


def terminate_pods(sb: Sandbox, pods: list[PodKey], pre_stop_s: float = 1.0, linger_s: float = 0.5,
                   timeout: float = 30.0) -> None:
    """Delete pods in Kubernetes' order (module docstring); returns once the objects are gone."""
    if not pods:
        return
    wanted = set(pods)
    stop_at = time.time() + pre_stop_s
    with sb.state.objects_txn() as objs:
        for ns, name in pods:
            pod = objs.get("Pod", ns, name)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                continue
            meta = dict(pod["metadata"])
            meta["deletionTimestamp"] = now_rfc3339()
            meta["deletionGracePeriodSeconds"] = 30
            meta["annotations"] = {**(meta.get("annotations") or {}), objects.STOP_AT_ANNOTATION: f"{stop_at:.3f}"}
            objs.put({**pod, "metadata": meta})
        objects.derive(objs)
    deadline = time.monotonic() + timeout
    while True:
        current = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in sb.pods()}
        if all(key not in current or _containers_terminated(current[key]) for key in wanted):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"sandbox {sb.name}: containers of {sorted(wanted)} not stopped in {timeout}s")
        time.sleep(0.05)
    nodes = sb.nodes()
    gone = [current[key] for key in wanted if key in current]
    sb._cleanup_pods(gone, nodes)  # CNI DEL: the IP is free now
    with sb.state.objects_txn() as objs:
        for p in gone:
            pod = objs.get("Pod", p["metadata"]["namespace"], p["metadata"]["name"])
            if pod is not None:
                meta = dict(pod["metadata"])
                meta["annotations"] = {**(meta.get("annotations") or {}), objects.IP_RELEASED_ANNOTATION: "true"}
                objs.put({**pod, "metadata": meta})
    time.sleep(linger_s)
    with sb.state.objects_txn() as objs:
        for p in gone:
            objs.delete("Pod", p["metadata"]["namespace"], p["metadata"]["name"])
        objects.derive(objs)


def _owned(sb: Sandbox, namespace: str, deployment: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    objs = sb.objects()
    dep = next(d for d in objs.of_kind("Deployment")
               if d["metadata"]["namespace"] == namespace and d["metadata"]["name"] == deployment)
    rss = [r for r in objs.of_kind("ReplicaSet")
           if r["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]]
    return dep, rss


def _pods_of(sb: Sandbox, rs: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in sb.pods(rs["metadata"]["namespace"])
            if p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]]


def rollout(sb: Sandbox, text: str, namespace: str, deployment: str, pre_stop_s: float = 1.0,
            timeout: float = 60.0) -> None:
    """Apply a changed Deployment as a rolling update (surge all, then terminate the old pods)."""
    sb.apply(text=text, keep_old=True)
    dep, rss = _owned(sb, namespace, deployment)
    thash = objects.pod_template_hash(dep)
    new = [r for r in rss if r["metadata"]["name"].endswith("-" + thash)]
    old = [r for r in rss if r not in new]
    deadline = time.monotonic() + timeout
    while not all(objects.pod_ready(p) for r in new for p in _pods_of(sb, r)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout of {namespace}/{deployment}: new pods not ready in {timeout}s")
        time.sleep(0.05)
    terminate_pods(sb, [(namespace, p["metadata"]["name"]) for r in old for p in _pods_of(sb, r)],
                   pre_stop_s=pre_stop_s)
    with sb.state.objects_txn() as objs:
        for r in old:
            objs.delete("ReplicaSet", namespace, r["metadata"]["name"])
        objects.derive(objs)


def scale_down(sb: Sandbox, namespace: str, deployment: str, replicas: int, text: str,
               pre_stop_s: float = 1.0) -> None:
    """Terminate the newest pods above `replicas` gracefully, then record the new replica count
    (`text`: the Deployment's manifest with that count, applied as kubectl would)."""
    _, rss = _owned(sb, namespace, deployment)
    pods = sorted((p for r in rss for p in _pods_of(sb, r)), key=lambda p: p["metadata"]["creationTimestamp"])
    extra = pods[replicas:]
    terminate_pods(sb, [(namespace, p["metadata"]["name"]) for p in extra], pre_stop_s=pre_stop_s)
    sb.apply(text=text)

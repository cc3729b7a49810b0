"""Pods -> workloads: the one owner resolution the agent and the controller share.

A pure function of Kubernetes-shaped JSON objects (dicts as the API returns them), so both the
controller's registry and the agent's no-controller identity file name every pod the same way.
The rules, and why:

* Only the ownerReference with `controller: true` is the pod's *controller*; other references are
  garbage-collection owners. A pod with several references and none marked controller has no
  controller: it is its own workload. One reference with no `controller` field at all
  (hand-written objects) is taken as the controller, since it is unambiguous.
* ReplicaSet -> its controller when that is a Deployment; a ReplicaSet with no controller (or one
  owned by a kind `stat` has no type for, e.g. an Argo Rollout) is the workload itself. When the
  ReplicaSet is not known (yet), a Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`
  and the pod carries that hash.
* StatefulSet, DaemonSet, Job: the owner itself. A Job created by a CronJob stays a Job (each run
  is its own workload; `stat` has no cronjob type).
* A static pod's mirror is owned by its Node: it is its own workload (`pod/NAME`), never the node.
* Any other owner kind (custom controllers): the pod itself, so every workload we name is one
  `stat` can select.

Also here, for the same reason (one answer on both sides): which pods carry an identity at all,
their IPs, readiness, start time and whether they are terminating.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodemesh.api.model import CAPTURE_DISABLED, CAPTURE_LABEL

Obj = dict[str, Any]
# (kind, namespace, name) -> the object, or None when it is not known.
ObjectLookup = Callable[[str, str, str], "Obj | None"]

TERMINAL_PHASES = ("Succeeded", "Failed")
_DIRECT_KINDS = {"StatefulSet": "statefulset", "DaemonSet": "daemonset", "Job": "job"}


@dataclass(frozen=True, slots=True)
class Owner:
    """The workload owning a pod: canonical type and name, and its ReplicaSet ("" when none)."""

    kind: str
    name: str
    replicaset: str = ""


def meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def controller_ref(obj: Obj) -> Obj | None:
    """The ownerReference with controller=true; a single reference with no `controller` field at
    all (hand-written objects) counts as it, one that says `controller: false` does not."""
    refs: list[Obj] = meta(obj).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return ref
    return refs[0] if len(refs) == 1 and "controller" not in refs[0] else None


def resolve_owner(pod: Obj, lookup: ObjectLookup) -> Owner:
    """The workload that owns `pod` (see the module docstring for the rules)."""
    m = meta(pod)
    ns, pod_name = m.get("namespace") or "default", m.get("name") or ""
    ref = controller_ref(pod)
    if ref is None:
        return Owner("pod", pod_name)
    kind, name = ref.get("kind") or "", ref.get("name") or ""
    if kind in _DIRECT_KINDS:
        return Owner(_DIRECT_KINDS[kind], name)
    if kind != "ReplicaSet":
        return Owner("pod", pod_name)  # Node (static pod mirror), custom controllers
    rs = lookup("ReplicaSet", ns, name)
    if rs is not None:
        rs_ref = controller_ref(rs)
        if rs_ref is not None and rs_ref.get("kind") == "Deployment":
            return Owner("deployment", rs_ref.get("name") or "", name)
        return Owner("replicaset", name, name)
    tmpl_hash = (m.get("labels") or {}).get("pod-template-hash") or ""
    if tmpl_hash and name.endswith("-" + tmpl_hash):
        return Owner("deployment", name[: -len(tmpl_hash) - 1], name)
    return Owner("replicaset", name, name)


# ---------------------------------------------------------------------------- pod facts
def pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [a.get("ip") for a in status.get("podIPs") or [] if a.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return ips


def pod_ready(pod: Obj) -> bool:
    """The Ready condition; with no conditions recorded, phase Running."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return str(status.get("phase")) == "Running"


def pod_finished(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def pod_has_identity(pod: Obj) -> bool:
    """Does the pod's IP name the pod? Not for hostNetwork pods (the IP is their node's), nor
    before an IP is assigned, nor once the IP may be another pod's: a finished pod, or a
    terminating one whose containers have all stopped (the kubelet tears the sandbox down, and
    with it the IP, right after; the object lingers until then and a little beyond)."""
    if not pod_ips(pod) or (pod.get("spec") or {}).get("hostNetwork") or pod_finished(pod):
        return False
    return not (pod_terminating(pod) and not pod_containers_running(pod))


def pod_containers_running(pod: Obj) -> bool:
    """Any container running, as the status says; with no container statuses recorded, assume so."""
    statuses = (pod.get("status") or {}).get("containerStatuses")
    if not statuses:
        return True
    return any("running" in (cs.get("state") or {}) for cs in statuses)


def parse_time_ms(text: str | None) -> int:
    """RFC 3339 (`2026-01-02T03:04:05Z`, fractions allowed) -> epoch milliseconds; 0 if absent/bad."""
    if not text:
        return 0
    try:
        value = _dt.datetime.fromisoformat(text)
    except ValueError:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    return int(value.timestamp() * 1000)


def pod_start_ms(pod: Obj) -> int:
    """When the pod's IP may first have been in use: the kubelet's startTime (set before the
    sandbox and its IP exist), else the creation time. Kubernetes stamps whole seconds."""
    return parse_time_ms((pod.get("status") or {}).get("startTime")) or \
        parse_time_ms(meta(pod).get("creationTimestamp"))


def pod_terminating(pod: Obj) -> bool:
    """Deletion has begun: the pod still runs (grace period), but its IP may be handed on once
    its containers are gone."""
    return bool(meta(pod).get("deletionTimestamp"))


def pod_uid(pod: Obj) -> str:
    """The pod's UID; objects without one (hand-written) are keyed by namespace/name."""
    m = meta(pod)
    return m.get("uid") or f"{m.get('namespace') or 'default'}/{m.get('name') or ''}"


def namespace_capture_disabled(ns: Obj) -> bool:
    m = meta(ns)
    return (m.get("labels") or {}).get(CAPTURE_LABEL) == CAPTURE_DISABLED or \
        (m.get("annotations") or {}).get(CAPTURE_LABEL) == CAPTURE_DISABLED

"""The identity table: pods -> workloads, one answer for the agent and the controller (issue 10, item 4).

Each row is a pod (and the owner objects the cluster holds) as Kubernetes writes them; the
expected workload is checked three ways: the pure function in `api.workloads`, the controller's
registry (what `stat` groups by), and the agent's identity built from the same objects without a
controller (what its metric labels say). They used to disagree on static pods and on owner
references without `controller: true`.
"""

from __future__ import annotations

from typing import Any

import pytest
from nodemesh.agent.identity import snapshot_from_objects
from nodemesh.api.clusterstate import ClusterObjects
from nodemesh.api.workloads import (
    Owner,
    controller_ref,
    parse_time_ms,
    pod_has_identity,
    pod_start_ms,
    pod_terminating,
    resolve_owner,
)
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry

NS = "shop"


def ref(kind: str, name: str, controller: bool | None = True) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": f"uid-{name}"}
    if controller is not None:
        out["controller"] = controller
    return out


def obj(kind: str, name: str, *refs: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": labels or {}}
    if refs:
        meta["ownerReferences"] = list(refs)
    return {"kind": kind, "metadata": meta}


def pod(name: str, *refs: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    p = obj("Pod", name, *refs, labels=labels)
    p["spec"] = {"nodeName": "node1", "containers": [{"name": "c"}]}
    p["status"] = {"phase": "Running", "podIP": "10.1.0.9", "podIPs": [{"ip": "10.1.0.9"}],
                   "startTime": "2026-01-02T03:04:05Z"}
    return p


# (case, pod, other objects, expected workload)
TABLE: list[tuple[str, dict[str, Any], list[dict[str, Any]], Owner]] = [
    ("Deployment -> ReplicaSet",
     pod("web-5f7c9-x2vqm", ref("ReplicaSet", "web-5f7c9"), labels={"pod-template-hash": "5f7c9"}),
     [obj("ReplicaSet", "web-5f7c9", ref("Deployment", "web"))],
     Owner("deployment", "web", "web-5f7c9")),
    ("ReplicaSet not known yet: pod-template-hash names the Deployment",
     pod("web-5f7c9-x2vqm", ref("ReplicaSet", "web-5f7c9"), labels={"pod-template-hash": "5f7c9"}),
     [], Owner("deployment", "web", "web-5f7c9")),
    ("bare ReplicaSet (no owner)",
     pod("cache-abcde", ref("ReplicaSet", "cache")), [obj("ReplicaSet", "cache")],
     Owner("replicaset", "cache", "cache")),
    ("ReplicaSet owned by a custom controller (Argo Rollout)",
     pod("canary-7f8-zz", ref("ReplicaSet", "canary-7f8")),
     [obj("ReplicaSet", "canary-7f8", ref("Rollout", "canary"))],
     Owner("replicaset", "canary-7f8", "canary-7f8")),
    ("StatefulSet", pod("db-0", ref("StatefulSet", "db")), [], Owner("statefulset", "db")),
    ("DaemonSet", pod("logger-7xk2d", ref("DaemonSet", "logger")), [], Owner("daemonset", "logger")),
    ("Job", pod("migrate-x7k2p", ref("Job", "migrate")), [], Owner("job", "migrate")),
    ("CronJob -> Job: the Job is the workload",
     pod("backup-28000-q1", ref("Job", "backup-28000")), [obj("Job", "backup-28000", ref("CronJob", "backup"))],
     Owner("job", "backup-28000")),
    ("bare pod", pod("debug"), [], Owner("pod", "debug")),
    ("static pod (mirror owned by its Node): the pod, never the node",
     pod("etcd-node1", {"apiVersion": "v1", "kind": "Node", "name": "node1", "uid": "n1", "controller": True}),
     [], Owner("pod", "etcd-node1")),
    ("custom owner kind (CloneSet)", pod("app-xyz", ref("CloneSet", "app")), [], Owner("pod", "app-xyz")),
    ("two owner references, none controller: no controller",
     pod("p", ref("StatefulSet", "a", controller=None), ref("StatefulSet", "b", controller=None)), [],
     Owner("pod", "p")),
    ("two owner references, the second is the controller",
     pod("db-1", ref("ConfigMap", "cm", controller=False), ref("StatefulSet", "db")), [], Owner("statefulset", "db")),
    ("one owner reference without the controller flag (hand-written): taken as the controller",
     pod("db-2", ref("StatefulSet", "db", controller=None)), [], Owner("statefulset", "db")),
    ("controller: false on the only reference: not a controller",
     pod("solo", ref("StatefulSet", "db", controller=False)), [], Owner("pod", "solo")),
]


def lookup_in(objects: list[dict[str, Any]]):
    by_key = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
    return lambda kind, ns, name: by_key.get((kind, ns, name))


@pytest.mark.parametrize("case,the_pod,others,expected", TABLE, ids=[row[0] for row in TABLE])
def test_one_owner_resolution_for_agent_and_controller(case: str, the_pod: dict[str, Any],
                                                       others: list[dict[str, Any]], expected: Owner) -> None:
    assert resolve_owner(the_pod, lookup_in(others)) == expected, case

    registry = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        registry.replace(kind, [o for o in [the_pod, *others] if o["kind"] == kind])
    record = registry.pod(NS, the_pod["metadata"]["name"])
    assert record is not None
    assert (record.workload.kind, record.workload.name, record.replicaset) == \
        (expected.kind, expected.name, expected.replicaset), f"controller: {case}"

    snap = snapshot_from_objects(ClusterObjects(1, [the_pod, *others]))
    (agent_pod,) = snap.pods
    assert (agent_pod.owner.type, agent_pod.owner.name) == (expected.kind, expected.name), f"agent: {case}"


def test_controller_ref_prefers_the_flagged_reference() -> None:
    p = pod("x", ref("ConfigMap", "cm", controller=False), ref("Job", "j"))
    assert controller_ref(p)["name"] == "j"  # type: ignore[index]
    assert controller_ref(pod("y")) is None


def test_which_pods_have_an_identity() -> None:
    p = pod("web")
    assert pod_has_identity(p)
    assert not pod_has_identity({**p, "spec": {**p["spec"], "hostNetwork": True}}), "the IP is the node's"
    assert not pod_has_identity({**p, "status": {**p["status"], "phase": "Succeeded"}}), "IP may be reused"
    assert not pod_has_identity({**p, "status": {"phase": "Pending"}}), "no IP yet"


def test_pod_lifetime_fields() -> None:
    p = pod("web")
    assert pod_start_ms(p) == parse_time_ms("2026-01-02T03:04:05Z") == 1767323045000
    assert pod_start_ms({"metadata": {"creationTimestamp": "2026-01-02T03:04:00Z"}}) == 1767323040000
    assert parse_time_ms("2026-01-02T03:04:05.25Z") == 1767323045250
    assert parse_time_ms("not a time") == 0 and parse_time_ms(None) == 0
    assert not pod_terminating(p)
    assert pod_terminating({**p, "metadata": {**p["metadata"], "deletionTimestamp": "2026-01-02T03:05:00Z"}})

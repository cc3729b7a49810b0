"""The workload registry: cluster objects in, workloads, services and identity out.

Both cluster sources (Kubernetes and the sandbox) feed the same Kubernetes-shaped JSON objects
through `apply()` / `replace()`, so nothing downstream can tell them apart. Derived views (pods
with their owning workload, services with endpoints, captured namespaces) are rebuilt lazily
after a change: a burst of watch events costs one rebuild, on the first read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import WorkloadRef
from nodemesh.api.workloads import (
    TERMINAL_PHASES,
    controller_ref,
    namespace_capture_disabled,
    pod_has_identity,
    pod_ips,
    pod_ready,
    pod_service_account,
    pod_start_ms,
    pod_terminating,
    pod_uid,
    resolve_owner,
)

log = logging.getLogger("nodemesh.controlplane.registry")

Obj = dict[str, Any]

# Every kind a cluster source delivers.
WATCHED_KINDS = (
    "Namespace", "Node", "Pod", "ReplicaSet", "Deployment", "StatefulSet", "DaemonSet", "Job",
    "Service", "EndpointSlice",
    # Gateway API routes (controlplane/routeconfig.py): their names win over automatic routes. A
    # cluster without the Gateway API CRDs lists them as empty (sources/kubernetes.py, OPTIONAL_KINDS).
    "HTTPRoute", "GRPCRoute",
)
# Canonical types whose rows come from an owner object of that kind.
WORKLOAD_KINDS = {"deployment": "Deployment", "statefulset": "StatefulSet", "daemonset": "DaemonSet",
                  "job": "Job", "replicaset": "ReplicaSet"}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(slots=True)
class PodRecord:
    namespace: str
    name: str
    ip: str
    node: str
    phase: str
    status: str                      # what `stat po` prints: Running, Pending, Terminating, ...
    ready: bool
    host_network: bool
    labels: dict[str, str]
    workload: WorkloadRef
    replicaset: str                  # owning ReplicaSet name, "" when none
    container_ports: dict[str, int]  # named container ports, to resolve Service targetPorts
    uid: str = ""
    start_ms: int = 0                # status.startTime (else creation), epoch ms
    terminating: bool = False        # deletionTimestamp set
    has_identity: bool = False       # its IP names it (api.workloads.pod_has_identity)
    ips: tuple[str, ...] = ()
    service_account: str = "default"  # spec.serviceAccountName: the pod's workload identity

    @property
    def running(self) -> bool:
        return self.phase not in TERMINAL_PHASES


@dataclass(frozen=True, slots=True)
class IdentityEntries:
    """The identity agents are told, as serialized entries (pods by uid, services by namespace
    and name, the mesh config), for the identity feed to diff without re-serializing."""

    resource_version: str
    pods: dict[str, bytes]
    services: dict[tuple[str, str], bytes]
    config: bytes
    namespaces: tuple[str, ...]


@dataclass(slots=True)
class EndpointRecord:
    ip: str
    ready: bool
    pod: str
    node: str


@dataclass(slots=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ip: str
    labels: dict[str, str]
    selector: dict[str, str]
    ports: list[tuple[str, int, int]]  # (name, port, numeric target port)
    endpoints: list[EndpointRecord]


@dataclass(slots=True)
class NodeRecord:
    name: str
    ready: bool
    internal_ip: str
    pod_cidrs: list[str]


@dataclass(slots=True)
class ResourceInfo:
    """One row candidate of `stat`: a namespaced resource and the pods it stands for."""

    namespace: str
    type: str                        # canonical type
    name: str
    labels: dict[str, str]
    pods: list[PodRecord] = field(default_factory=list)


def _meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def _key(obj: Obj) -> tuple[str, str]:
    m = _meta(obj)
    return (m.get("namespace") or "", m.get("name") or "")


def _pod_status(pod: Obj) -> str:
    """The STATUS column as kubectl would summarise it (reason first, then phase)."""
    if _meta(pod).get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    return str(status.get("reason") or status.get("phase") or "Unknown")


class WorkloadRegistry:
    """Cluster objects keyed by kind and (namespace, name), plus views derived from them."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in WATCHED_KINDS}
        self._listeners: list[Callable[[], None]] = []
        self.version = 0             # bumped on every effective change
        self._derived_version = -1
        self._pods: list[PodRecord] = []
        self._pods_by_key: dict[tuple[str, str], PodRecord] = {}
        self._services: list[ServiceRecord] = []
        self._synced_kinds: set[str] = set()
        # Derivation is incremental where it costs: a pod's record is rebuilt only when its object
        # or its ReplicaSet's changed (a 50,000-pod cluster re-derived every pod on every change),
        # and its identity entry (a serialized pb.Pod) only when its record did.
        self._pod_cache: dict[tuple[str, str], tuple[Obj, Obj | None, PodRecord]] = {}
        self._pod_entries: dict[tuple[str, str], tuple[PodRecord, bytes]] = {}

    # ------------------------------------------------------------------ input
    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs after every effective change (the controller debounces it)."""
        self._listeners.append(callback)

    def apply(self, event_type: str, obj: Obj) -> None:
        """One watch event: ADDED, MODIFIED or DELETED, with a full object."""
        kind = obj.get("kind", "")
        store = self._objects.get(kind)
        if store is None:
            return
        key = _key(obj)
        if event_type == "DELETED":
            if store.pop(key, None) is None:
                return
        else:
            old = store.get(key)
            if old is not None and _meta(old).get("resourceVersion") == _meta(obj).get("resourceVersion") \
                    and old == obj:
                return
            store[key] = obj
        self._changed()

    def replace(self, kind: str, items: Iterable[Obj]) -> None:
        """A full list of one kind (initial list, relist after 410): objects absent are gone."""
        if kind not in self._objects:
            return
        new = {}
        for obj in items:
            obj.setdefault("kind", kind)
            new[_key(obj)] = obj
        self._synced_kinds.add(kind)
        if new == self._objects[kind]:
            return
        self._objects[kind] = new
        self._changed()

    @property
    def synced(self) -> bool:
        return self._synced_kinds >= set(WATCHED_KINDS)

    def mark_synced(self, kinds: Iterable[str] = WATCHED_KINDS) -> None:
        self._synced_kinds.update(kinds)

    def _changed(self) -> None:
        self.version += 1
        for cb in self._listeners:
            try:
                cb()
            except Exception:  # a listener bug must not break the source feeding us
                log.exception("event=registry_listener_failed")

    def objects(self, kind: str) -> list[Obj]:
        return list(self._objects.get(kind, {}).values())

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._objects.get(kind, {}).get((namespace, name))

    # ------------------------------------------------------------------ owner resolution
    def resolve_owner(self, pod: Obj) -> tuple[WorkloadRef, str]:
        """The workload owning `pod`, and its ReplicaSet's name (or ""): api.workloads' rules."""
        owner = resolve_owner(pod, self.get)
        return WorkloadRef(_key(pod)[0], owner.kind, owner.name), owner.replicaset

    # ------------------------------------------------------------------ derived views
    def _derive(self) -> None:
        if self._derived_version == self.version:
            return
        pods: list[PodRecord] = []
        cache = self._pod_cache
        fresh: dict[tuple[str, str], tuple[Obj, Obj | None, PodRecord]] = {}
        replicasets = self._objects["ReplicaSet"]
        for key, pod in self._objects["Pod"].items():
            # The only other object a pod's record reads is its ReplicaSet (owner resolution).
            ref = controller_ref(pod)
            rs_obj = replicasets.get((key[0], ref.get("name") or "")) \
                if ref is not None and ref.get("kind") == "ReplicaSet" else None
            hit = cache.get(key)
            if hit is not None and (hit[0] is pod or hit[0] == pod) and (hit[1] is rs_obj or hit[1] == rs_obj):
                fresh[key] = (pod, rs_obj, hit[2])
                pods.append(hit[2])
                continue
            m, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
            workload, rs = self.resolve_owner(pod)
            ports = {p["name"]: int(p["containerPort"])
                     for c in spec.get("containers") or [] for p in c.get("ports") or []
                     if p.get("name") and p.get("containerPort")}
            pods.append(PodRecord(
                namespace=m.get("namespace") or "", name=m.get("name") or "",
                ip=status.get("podIP") or "", node=spec.get("nodeName") or "",
                phase=status.get("phase") or "Unknown", status=_pod_status(pod), ready=pod_ready(pod),
                host_network=bool(spec.get("hostNetwork")), labels=dict(m.get("labels") or {}),
                workload=workload, replicaset=rs, container_ports=ports,
                uid=pod_uid(pod), start_ms=pod_start_ms(pod), terminating=pod_terminating(pod),
                has_identity=pod_has_identity(pod), ips=tuple(pod_ips(pod)),
                service_account=pod_service_account(pod),
            ))
            fresh[key] = (pod, rs_obj, pods[-1])
        self._pod_cache = fresh
        pods.sort(key=lambda p: (p.namespace, p.name))
        self._pods = pods
        self._pods_by_key = {(p.namespace, p.name): p for p in pods}
        # EndpointSlices by the Service they belong to, once (a scan of every slice per Service
        # was O(services x slices): 25 M steps per change at 5,000 Services).
        slices: dict[tuple[str, str], list[Obj]] = {}
        for sl in self._objects["EndpointSlice"].values():
            name = (_meta(sl).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if name:
                slices.setdefault((_key(sl)[0], name), []).append(sl)
        self._services = [self._service_record(svc, slices.get(_key(svc), []))
                          for svc in self._objects["Service"].values()]
        self._services.sort(key=lambda s: (s.namespace, s.name))
        self._derived_version = self.version

    def _service_record(self, svc: Obj, slices: list[Obj]) -> ServiceRecord:
        """`slices`: the EndpointSlices labelled with this Service's name in its namespace."""
        ns, name = _key(svc)
        spec = svc.get("spec") or {}
        selector = dict(spec.get("selector") or {})
        slice_ports = {p.get("name") or "": int(p["port"]) for s in slices for p in s.get("ports") or []
                       if p.get("port")}
        endpoints: list[EndpointRecord] = []
        if slices:
            for s in slices:
                for ep in s.get("endpoints") or []:
                    ready = (ep.get("conditions") or {}).get("ready")
                    target = ep.get("targetRef") or {}
                    for ip in ep.get("addresses") or []:
                        endpoints.append(EndpointRecord(
                            ip=ip, ready=ready is not False,
                            pod=target.get("name", "") if target.get("kind") == "Pod" else "",
                            node=ep.get("nodeName") or "",
                        ))
        elif selector:
            # No EndpointSlices recorded (e.g. a minimal sandbox): compute them as the endpoint
            # controller would, from the pods the selector matches.
            for p in self._pods:
                if p.namespace == ns and p.ip and p.running and not p.host_network \
                        and all(p.labels.get(k) == v for k, v in selector.items()):
                    endpoints.append(EndpointRecord(ip=p.ip, ready=p.ready, pod=p.name, node=p.node))
        endpoints.sort(key=lambda e: e.ip)
        ports = []
        for p in spec.get("ports") or []:
            pname, port = p.get("name") or "", int(p.get("port") or 0)
            ports.append((pname, port, self._target_port(ns, p, slice_ports, endpoints)))
        cluster_ip = spec.get("clusterIP") or ""
        return ServiceRecord(ns, name, "" if cluster_ip == "None" else cluster_ip,
                             dict(_meta(svc).get("labels") or {}), selector, ports, endpoints)

    def _target_port(self, ns: str, port: Obj, slice_ports: dict[str, int],
                     endpoints: list[EndpointRecord]) -> int:
        pname = port.get("name") or ""
        if pname in slice_ports:  # the endpoint controller already resolved named ports
            return slice_ports[pname]
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            return int(target)
        for ep in endpoints:  # a named targetPort: look it up on a backing pod
            rec = self._pods_by_key.get((ns, ep.pod))
            if rec and target in rec.container_ports:
                return rec.container_ports[target]
        return int(port.get("port") or 0)

    def pods(self) -> list[PodRecord]:
        self._derive()
        return self._pods

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        self._derive()
        return self._pods_by_key.get((namespace, name))

    def services(self) -> list[ServiceRecord]:
        self._derive()
        return self._services

    def nodes(self) -> list[NodeRecord]:
        out = []
        for node in self._objects["Node"].values():
            status = node.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
            ip = next((a.get("address", "") for a in status.get("addresses") or []
                       if a.get("type") == "InternalIP"), "")
            spec = node.get("spec") or {}
            cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
            out.append(NodeRecord(_key(node)[1], ready, ip, cidrs))
        return sorted(out, key=lambda n: n.name)

    def namespaces(self) -> dict[str, dict[str, str]]:
        """Every namespace known (objects, or implied by a namespaced object) -> its labels."""
        out: dict[str, dict[str, str]] = {}
        for kind, store in self._objects.items():
            if kind in ("Namespace", "Node"):
                continue
            for ns, _ in store:
                out.setdefault(ns, {})
        for ns_obj in self._objects["Namespace"].values():
            out[_key(ns_obj)[1]] = dict(_meta(ns_obj).get("labels") or {})
        out.pop("", None)
        return out

    def captured_namespaces(self, excluded: Iterable[str] = (), only: Iterable[str] = ()) -> list[str]:
        """Namespaces whose pods are captured: not excluded, not labelled/annotated
        `nodemesh.io/capture=disabled`, and — when `only` is given — listed in it."""
        excluded, only = set(excluded), set(only)
        disabled = {_key(o)[1] for o in self._objects["Namespace"].values() if namespace_capture_disabled(o)}
        return sorted(ns for ns in self.namespaces()
                      if ns not in excluded and ns not in disabled and (not only or ns in only))

    # ------------------------------------------------------------------ stat resources
    def resources(self, type_: str, namespace: str | None) -> list[ResourceInfo]:
        """Resources of a canonical type in `namespace` (None: all namespaces), with their pods."""
        self._derive()
        in_ns = (lambda ns: True) if namespace is None else (lambda ns: ns == namespace)
        out: list[ResourceInfo] = []
        if type_ == "namespace":
            for ns, labels in sorted(self.namespaces().items()):
                if namespace is None or ns == namespace:
                    out.append(ResourceInfo("", "namespace", ns, labels,
                                            [p for p in self._pods if p.namespace == ns]))
        elif type_ == "pod":
            for p in self._pods:
                if in_ns(p.namespace):
                    out.append(ResourceInfo(p.namespace, "pod", p.name, p.labels, [p]))
        elif type_ == "service":
            for s in self._services:
                if in_ns(s.namespace):
                    out.append(ResourceInfo(s.namespace, "service", s.name, s.labels, self.service_pods(s)))
        elif type_ in WORKLOAD_KINDS:
            # Pods grouped by owner in one pass (a scan of every pod per workload was O(W x P)).
            owned: dict[tuple[str, str], list[PodRecord]] = {}
            for p in self._pods:
                if type_ == "replicaset":
                    owned.setdefault((p.namespace, p.replicaset), []).append(p)
                elif p.workload.kind == type_:
                    owned.setdefault((p.namespace, p.workload.name), []).append(p)
            for obj in self._objects[WORKLOAD_KINDS[type_]].values():
                ns, name = _key(obj)
                if not in_ns(ns):
                    continue
                pods = owned.get((ns, name), [])
                out.append(ResourceInfo(ns, type_, name, dict(_meta(obj).get("labels") or {}), pods))
        out.sort(key=lambda r: (r.namespace, r.name))
        return out

    def resource(self, type_: str, namespace: str, name: str) -> ResourceInfo | None:
        ns = None if type_ == "namespace" else namespace
        for r in self.resources(type_, ns):
            if r.name == name:
                return r
        return None

    def service_pods(self, svc: ServiceRecord) -> list[PodRecord]:
        pods = []
        for ep in svc.endpoints:
            rec = self._pods_by_key.get((svc.namespace, ep.pod))
            if rec is not None and rec not in pods:
                pods.append(rec)
        return pods

    # ------------------------------------------------------------------ identity
    def identity_snapshot(self, config: pb.MeshConfig, captured_only: Iterable[str] = ()) -> pb.IdentitySnapshot:
        """Everything an agent needs to name peers and pick ClusterIP endpoints."""
        entries = self.identity_entries(config, captured_only)
        snap = pb.IdentitySnapshot(resource_version=entries.resource_version)
        snap.pods.extend(pb.Pod.FromString(b) for b in entries.pods.values())
        snap.services.extend(pb.Service.FromString(b) for b in entries.services.values())
        snap.config.CopyFrom(config)
        snap.captured_namespaces.extend(entries.namespaces)
        return snap

    def identity_entries(self, config: pb.MeshConfig, captured_only: Iterable[str] = ()) -> IdentityEntries:
        """The identity as serialized entries (what `IdentityFeed.update_entries` diffs): a pod's
        entry is re-serialized only when its record changed."""
        self._derive()
        cached = self._pod_entries
        fresh: dict[tuple[str, str], tuple[PodRecord, bytes]] = {}
        pods: dict[str, bytes] = {}
        for p in self._pods:
            # hostNetwork pods share their node's IP, so the IP names the node, not the pod;
            # finished pods, and terminating ones with every container stopped, may have handed
            # their IP to a new pod already (api.workloads.pod_has_identity).
            if not p.has_identity:
                continue
            key = (p.namespace, p.name)
            hit = cached.get(key)
            if hit is not None and hit[0] is p:
                data = hit[1]
            else:
                data = pb.Pod(
                    ip=p.ips[0], ips=p.ips, namespace=p.namespace, name=p.name, node=p.node, ready=p.ready,
                    labels=p.labels, uid=p.uid, start_time_ms=p.start_ms, terminating=p.terminating,
                    service_account=p.service_account,
                    owner=pb.Resource(namespace=p.workload.namespace, type=p.workload.kind, name=p.workload.name),
                ).SerializeToString(deterministic=True)
            fresh[key] = (p, data)
            pods[p.uid or f"{p.namespace}/{p.name}"] = data
        self._pod_entries = fresh
        services = {(s.namespace, s.name): pb.Service(
            namespace=s.namespace, name=s.name, cluster_ip=s.cluster_ip,
            ports=[pb.ServicePort(name=n, port=port, target_port=tp) for n, port, tp in s.ports],
            endpoints=[pb.Endpoint(ip=e.ip, ready=e.ready, pod=e.pod, node=e.node) for e in s.endpoints],
        ).SerializeToString(deterministic=True) for s in self._services}
        return IdentityEntries(str(self.version), pods, services, config.SerializeToString(deterministic=True),
                               tuple(self.captured_namespaces(config.excluded_namespaces, captured_only)))

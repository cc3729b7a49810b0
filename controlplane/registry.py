"""The workload registry: cluster objects in, workloads, services and identity out.

Both cluster sources (Kubernetes and the sandbox) feed the same Kubernetes-shaped JSON objects
through `apply()` / `replace()`, so nothing downstream can tell them apart. Derived views (pods
with their owning workload, services with endpoints, captured namespaces, the identity entries)
are brought up to date lazily, on the first read after a change, and only for what the change
touches: an event marks its pod (a ReplicaSet's: the pods it owns; a Service's or an
EndpointSlice's: its Service; a pod's: the Services of its namespace, whose endpoints or named
ports may come from it) and the next read rebuilds those. One pod's change at 50,000 pods costs
milliseconds, not a re-derivation of the cluster (docs/scale.md "Identity derivation").
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import deque
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
# How many identity_entries calls' changed keys are kept for the feed's diff (it reads every one).
IDENTITY_CHANGES_KEPT = 64
# pods() puts up to this many changed records in place in its sorted list; more: it sorts again
RESORT_AFTER = 2000


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
    and name, the mesh config), for the identity feed to diff without re-serializing. `pods` and
    `services` are the registry's own dicts, valid until its next change (copying 50,000 entries
    on every change cost more than the change): a reader that keeps them copies them."""

    resource_version: str
    pods: dict[str, bytes]
    services: dict[tuple[str, str], bytes]
    config: bytes
    namespaces: tuple[str, ...]
    # Which entries changed, for a reader that took an earlier generation of the same registry
    # (`source`, random per registry) (`changed_since`).
    source: int = 0
    generation: int = 0
    changes: tuple[EntryChange, ...] = ()

    def changed_since(self, generation: int) -> tuple[set[str], set[tuple[str, str]]] | None:
        """The pod and service entry keys changed after `generation` (one this registry gave):
        None when the log does not reach back that far (then diff everything)."""
        if generation <= 0 or generation > self.generation:
            return None
        if generation == self.generation:
            return set(), set()
        if not self.changes or self.changes[0].generation > generation + 1:
            return None
        pods: set[str] = set()
        services: set[tuple[str, str]] = set()
        for c in self.changes:
            if c.generation > generation:
                pods.update(c.pods)
                services.update(c.services)
        return pods, services


@dataclass(frozen=True, slots=True)
class EntryChange:
    """The entry keys one `identity_entries` call changed (added, re-serialized or removed)."""

    generation: int
    pods: frozenset[str]
    services: frozenset[tuple[str, str]]


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


def _reads_pods(svc: Obj, slices: list[Obj]) -> bool:
    """Does a Service's record read pod records (`WorkloadRegistry._service_record`)? With no
    EndpointSlice its endpoints come from the pods its selector matches; a named targetPort the
    slices do not resolve is looked up on a backing pod."""
    spec = svc.get("spec") or {}
    if not slices and spec.get("selector"):
        return True
    slice_names = {p.get("name") or "" for s in slices for p in s.get("ports") or [] if p.get("port")}
    for port in spec.get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, str) and not target.isdigit() and (port.get("name") or "") not in slice_names:
            return True
    return False


class WorkloadRegistry:
    """Cluster objects keyed by kind and (namespace, name), plus views derived from them."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in WATCHED_KINDS}
        self._listeners: list[Callable[[], None]] = []
        self.version = 0             # bumped on every effective change
        self._synced_kinds: set[str] = set()
        # Indexes kept at input time (every change passes `_touch`):
        self._ns_objects: dict[str, int] = {}        # namespace -> namespaced objects in it
        self._slices_of: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}  # Service -> its slices
        # What changed since the last derivation (`_derive` takes these):
        self._dirty_pods: set[tuple[str, str]] = set()
        self._dirty_services: set[tuple[str, str]] = set()
        # Derived, kept up to date by `_derive` for the keys marked dirty:
        self._derived_version = -1
        self._pod_records: dict[tuple[str, str], PodRecord] = {}
        # the pod object and its ReplicaSet object a record was built from (a record reads no other)
        self._pod_sources: dict[tuple[str, str], tuple[Obj, Obj | None]] = {}
        self._pods_in: dict[str, dict[tuple[str, str], PodRecord]] = {}   # namespace -> its pods
        self._rs_pods: dict[tuple[str, str], set[tuple[str, str]]] = {}   # ReplicaSet -> pods naming it
        self._service_records: dict[tuple[str, str], ServiceRecord] = {}
        # namespace -> the Services whose record reads its pods (endpoints from a selector with no
        # EndpointSlice, a named targetPort looked up on a pod): a pod's change re-derives these
        self._pod_readers: dict[str, set[tuple[str, str]]] = {}
        self._pods_sorted: list[PodRecord] | None = None   # pods() by (namespace, name)
        self._pod_keys_sorted: list[tuple[str, str]] = []  # their keys, in the same order
        self._pods_moved: set[tuple[str, str]] = set()     # records changed since pods() last sorted
        self._services_sorted: list[ServiceRecord] | None = None
        # The identity agents are told, as serialized entries, kept per changed record: pods by
        # uid (pod key -> (entry key, bytes)), services by key.
        self._identity_dirty_pods: set[tuple[str, str]] = set()
        self._identity_dirty_services: set[tuple[str, str]] = set()
        self._pod_entries: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._identity_pods: dict[str, bytes] = {}
        self._identity_services: dict[tuple[str, str], bytes] = {}
        self._identity_source = random.getrandbits(62) or 1
        self._identity_generation = 0
        self._identity_changes: deque[EntryChange] = deque(maxlen=IDENTITY_CHANGES_KEPT)

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
        old = store.get(key)
        if event_type == "DELETED":
            if old is None:
                return
            del store[key]
            self._touch(kind, key, old, None)
        else:
            if old is not None and _meta(old).get("resourceVersion") == _meta(obj).get("resourceVersion") \
                    and old == obj:
                return
            store[key] = obj
            self._touch(kind, key, old, obj)
        self._changed()

    def replace(self, kind: str, items: Iterable[Obj]) -> None:
        """A full list of one kind (initial list, relist after 410): objects absent are gone.
        Only the objects that differ from those held count as changed."""
        if kind not in self._objects:
            return
        new = {}
        for obj in items:
            obj.setdefault("kind", kind)
            new[_key(obj)] = obj
        self._synced_kinds.add(kind)
        old = self._objects[kind]
        self._objects[kind] = new
        changed = False
        for key, obj in new.items():
            prev = old.get(key)
            if prev is None or (prev is not obj and prev != obj):
                self._touch(kind, key, prev, obj)
                changed = True
        for key in old.keys() - new.keys():
            self._touch(kind, key, old[key], None)
            changed = True
        if changed:
            self._changed()

    def _touch(self, kind: str, key: tuple[str, str], old: Obj | None, new: Obj | None) -> None:
        """Keep the input-time indexes and mark what the change of one object can alter."""
        ns = key[0]
        if kind not in ("Namespace", "Node") and (old is None) != (new is None):
            n = self._ns_objects.get(ns, 0) + (1 if old is None else -1)
            if n > 0:
                self._ns_objects[ns] = n
            else:
                self._ns_objects.pop(ns, None)
        if kind == "Pod":
            self._dirty_pods.add(key)
        elif kind == "ReplicaSet":
            self._dirty_pods.update(self._rs_pods.get(key, ()))
        elif kind == "Service":
            self._dirty_services.add(key)
        elif kind == "EndpointSlice":
            # a slice belongs to the Service its label names (a relabel moves it: both change)
            if old is not None and (name := (_meta(old).get("labels") or {}).get(SERVICE_NAME_LABEL)):
                self._dirty_services.add((ns, name))
                slices = self._slices_of.get((ns, name), {})
                slices.pop(key, None)
                if not slices:
                    self._slices_of.pop((ns, name), None)
            if new is not None and (name := (_meta(new).get("labels") or {}).get(SERVICE_NAME_LABEL)):
                self._dirty_services.add((ns, name))
                self._slices_of.setdefault((ns, name), {})[key] = new

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
        """Rebuild the records marked dirty since the last call (pods first: services read them)."""
        if self._derived_version == self.version:
            return
        dirty, self._dirty_pods = self._dirty_pods, set()
        services_dirty, self._dirty_services = self._dirty_services, set()
        for key in dirty:
            if self._derive_pod(key):
                self._pods_moved.add(key)
                self._identity_dirty_pods.add(key)
                services_dirty.update(self._pod_readers.get(key[0], ()))
        for skey in services_dirty:
            svc = self._objects["Service"].get(skey)
            old_rec = self._service_records.get(skey)
            readers = self._pod_readers.setdefault(skey[0], set())
            readers.discard(skey)
            if svc is None:
                if old_rec is None:
                    continue
                del self._service_records[skey]
            else:
                slices = [sl for _, sl in sorted(self._slices_of.get(skey, {}).items())]  # by name: one order
                if _reads_pods(svc, slices):
                    readers.add(skey)
                rec = self._service_record(svc, slices)
                if rec == old_rec:
                    continue
                self._service_records[skey] = rec
            self._services_sorted = None
            self._identity_dirty_services.add(skey)
        self._derived_version = self.version

    def _derive_pod(self, key: tuple[str, str]) -> bool:
        """Bring one pod's record up to its object (and its ReplicaSet's); True when it changed."""
        pod = self._objects["Pod"].get(key)
        ref = controller_ref(pod) if pod is not None else None
        rs_key = (key[0], ref.get("name") or "") if ref is not None and ref.get("kind") == "ReplicaSet" else None
        rs_obj = self._objects["ReplicaSet"].get(rs_key) if rs_key is not None else None
        src = self._pod_sources.get(key)
        if pod is not None and src is not None and (src[0] is pod or src[0] == pod) \
                and (src[1] is rs_obj or src[1] == rs_obj):
            self._pod_sources[key] = (pod, rs_obj)
            return False
        old = self._pod_records.pop(key, None)
        self._pod_sources.pop(key, None)
        if old is not None:
            in_ns = self._pods_in[key[0]]
            del in_ns[key]
            if not in_ns:
                del self._pods_in[key[0]]
            if old.replicaset:
                owned = self._rs_pods.get((key[0], old.replicaset))
                if owned is not None:
                    owned.discard(key)
                    if not owned:
                        del self._rs_pods[(key[0], old.replicaset)]
        if pod is None:
            return old is not None
        m, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
        workload, rs = self.resolve_owner(pod)
        ports = {p["name"]: int(p["containerPort"])
                 for c in spec.get("containers") or [] for p in c.get("ports") or []
                 if p.get("name") and p.get("containerPort")}
        rec = PodRecord(
            namespace=m.get("namespace") or "", name=m.get("name") or "",
            ip=status.get("podIP") or "", node=spec.get("nodeName") or "",
            phase=status.get("phase") or "Unknown", status=_pod_status(pod), ready=pod_ready(pod),
            host_network=bool(spec.get("hostNetwork")), labels=dict(m.get("labels") or {}),
            workload=workload, replicaset=rs, container_ports=ports,
            uid=pod_uid(pod), start_ms=pod_start_ms(pod), terminating=pod_terminating(pod),
            has_identity=pod_has_identity(pod), ips=tuple(pod_ips(pod)),
            service_account=pod_service_account(pod),
        )
        self._pod_records[key] = rec
        self._pod_sources[key] = (pod, rs_obj)
        self._pods_in.setdefault(key[0], {})[key] = rec
        if rs_key is not None:
            # indexed by the ReplicaSet the pod names (held or not): its arrival re-derives the pod
            self._rs_pods.setdefault(rs_key, set()).add(key)
        return True

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
            for p in sorted(self._pods_in.get(ns, {}).values(), key=lambda p: p.name):
                if p.ip and p.running and not p.host_network \
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
            rec = self._pod_records.get((ns, ep.pod))
            if rec and target in rec.container_ports:
                return rec.container_ports[target]
        return int(port.get("port") or 0)

    def pods(self) -> list[PodRecord]:
        """Every pod's record, by namespace and name."""
        self._derive()
        moved, records = self._pods_moved, self._pod_records
        if self._pods_sorted is None or len(moved) > RESORT_AFTER:
            self._pod_keys_sorted = sorted(records)
            self._pods_sorted = [records[k] for k in self._pod_keys_sorted]
        elif moved:
            # a few changed: put them in place (a new list: a caller may still hold the old one)
            keys, out = self._pod_keys_sorted, list(self._pods_sorted)
            for key in moved:
                i = bisect.bisect_left(keys, key)
                rec, present = records.get(key), i < len(keys) and keys[i] == key
                if rec is None:
                    if present:
                        del keys[i], out[i]
                elif present:
                    out[i] = rec
                else:
                    keys.insert(i, key)
                    out.insert(i, rec)
            self._pods_sorted = out
        moved.clear()
        return self._pods_sorted

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        self._derive()
        return self._pod_records.get((namespace, name))

    def services(self) -> list[ServiceRecord]:
        """Every Service's record, by namespace and name."""
        self._derive()
        if self._services_sorted is None:
            self._services_sorted = sorted(self._service_records.values(), key=lambda s: (s.namespace, s.name))
        return self._services_sorted

    def service(self, namespace: str, name: str) -> ServiceRecord | None:
        self._derive()
        return self._service_records.get((namespace, name))

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
        out: dict[str, dict[str, str]] = {ns: {} for ns in self._ns_objects}
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
        pods = self.pods() if namespace is None else self._pods_of(namespace)
        if type_ == "namespace":
            for ns, labels in sorted(self.namespaces().items()):
                if namespace is None or ns == namespace:
                    out.append(ResourceInfo("", "namespace", ns, labels, self._pods_of(ns)))
        elif type_ == "pod":
            out.extend(ResourceInfo(p.namespace, "pod", p.name, p.labels, [p]) for p in pods)
        elif type_ == "service":
            for s in self.services():
                if in_ns(s.namespace):
                    out.append(ResourceInfo(s.namespace, "service", s.name, s.labels, self.service_pods(s)))
        elif type_ in WORKLOAD_KINDS:
            # Pods grouped by owner in one pass (a scan of every pod per workload was O(W x P)).
            owned: dict[tuple[str, str], list[PodRecord]] = {}
            for p in pods:
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

    def _pods_of(self, namespace: str) -> list[PodRecord]:
        return sorted(self._pods_in.get(namespace, {}).values(), key=lambda p: p.name)

    def resource(self, type_: str, namespace: str, name: str) -> ResourceInfo | None:
        ns = None if type_ == "namespace" else namespace
        for r in self.resources(type_, ns):
            if r.name == name:
                return r
        return None

    def service_pods(self, svc: ServiceRecord) -> list[PodRecord]:
        self._derive()
        pods: dict[str, PodRecord] = {}
        for ep in svc.endpoints:
            rec = self._pod_records.get((svc.namespace, ep.pod))
            if rec is not None:
                pods.setdefault(rec.name, rec)
        return list(pods.values())

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
        """The identity as serialized entries (what `IdentityFeed.update_entries` diffs): only the
        entries of records changed since the last call are serialized again (pods are keyed by
        uid, which the API server makes unique)."""
        self._derive()
        dirty, self._identity_dirty_pods = self._identity_dirty_pods, set()
        changed_pods: set[str] = set()
        for key in dirty:
            old = self._pod_entries.pop(key, None)
            if old is not None:
                self._identity_pods.pop(old[0], None)
                changed_pods.add(old[0])
            p = self._pod_records.get(key)
            # hostNetwork pods share their node's IP, so the IP names the node, not the pod;
            # finished pods, and terminating ones with every container stopped, may have handed
            # their IP to a new pod already (api.workloads.pod_has_identity).
            if p is None or not p.has_identity:
                continue
            data = pb.Pod(
                ip=p.ips[0], ips=p.ips, namespace=p.namespace, name=p.name, node=p.node, ready=p.ready,
                labels=p.labels, uid=p.uid, start_time_ms=p.start_ms, terminating=p.terminating,
                service_account=p.service_account,
                owner=pb.Resource(namespace=p.workload.namespace, type=p.workload.kind, name=p.workload.name),
            ).SerializeToString(deterministic=True)
            entry_key = p.uid or f"{p.namespace}/{p.name}"
            self._pod_entries[key] = (entry_key, data)
            self._identity_pods[entry_key] = data
            changed_pods.add(entry_key)
        sdirty, self._identity_dirty_services = self._identity_dirty_services, set()
        for skey in sdirty:
            s = self._service_records.get(skey)
            if s is None:
                self._identity_services.pop(skey, None)
                continue
            self._identity_services[skey] = pb.Service(
                namespace=s.namespace, name=s.name, cluster_ip=s.cluster_ip,
                ports=[pb.ServicePort(name=n, port=port, target_port=tp) for n, port, tp in s.ports],
                endpoints=[pb.Endpoint(ip=e.ip, ready=e.ready, pod=e.pod, node=e.node) for e in s.endpoints],
            ).SerializeToString(deterministic=True)
        if changed_pods or sdirty:
            self._identity_generation += 1
            self._identity_changes.append(EntryChange(self._identity_generation, frozenset(changed_pods),
                                                      frozenset(sdirty)))
        pods, services = self._identity_pods, self._identity_services
        return IdentityEntries(str(self.version), pods, services, config.SerializeToString(deterministic=True),
                               tuple(self.captured_namespaces(config.excluded_namespaces, captured_only)),
                               self._identity_source, self._identity_generation, tuple(self._identity_changes))

"""The agent's IP -> workload index, and Service ClusterIP -> ready endpoints.

Fed by identity messages from the controller: a full `IdentitySnapshot` (replace everything) or an
`IdentityDelta` (what changed since a version; it applies only on top of exactly that version of
the same epoch, else `IdentityGap` and the caller asks for a full snapshot). The sandbox's recorded
objects, when there is no controller, come in as full snapshots (`agent.identity`).

Pod IPs are reused by Kubernetes, so pods are held by uid and an IP may briefly have two claimants
(a terminating pod and its successor, in the controller's view). The IP's owner is the claimant
that is not terminating, then the one that started last. `resolve(ip, at_ms)` also refuses an
owner that started after the moment asked about (with a margin for clock skew and the whole
seconds Kubernetes stamps): a connection opened before a pod existed was not that pod's.

Lookups are plain dict reads (the traffic path calls them per connection, and again only when an
update touched the connection's addresses). `apply` returns what changed — the IPs whose owner
changed and the ClusterIPs whose service changed — so the telemetry re-resolves just those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodemesh.agent.identity import snapshot_from_objects
from nodemesh.api.clusterstate import ClusterObjects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import UNKNOWN_KIND, UNKNOWN_NAMESPACE, PodIdentity, WorkloadRef

# Who a peer is, as the metric labels spell it: (namespace, kind, name, pod).
PeerLabels = tuple[str, str, str, str]

# A pod's start time is stamped in whole seconds by the kubelet of its node; the agent asking may
# run on another node. An owner that started more than this after a connection opened did not
# open it.
START_SLACK_MS = 2000


def unknown_labels(ip: str) -> PeerLabels:
    return (UNKNOWN_NAMESPACE, UNKNOWN_KIND, ip, "")


class IdentityGap(Exception):
    """A delta that does not apply on top of what the index holds: ask for a full snapshot."""


@dataclass(slots=True)
class ServiceEntry:
    name: str                                    # "name.namespace"
    ready_endpoints: list[tuple[str, int]] = field(default_factory=list)


class Owner:
    """The pod that owns an IP, as the traffic path needs it."""

    __slots__ = ("identity", "labels", "local", "start_ms", "terminating", "uid")

    def __init__(self, pod: pb.Pod, ip: str, node: str) -> None:
        kind = pod.owner.type or "pod"
        name = pod.owner.name or pod.name
        self.uid = pod.uid or f"{pod.namespace}/{pod.name}"
        self.start_ms = pod.start_time_ms
        self.terminating = pod.terminating
        self.labels: PeerLabels = (pod.namespace, kind, name, pod.name)
        self.local = bool(node) and pod.node == node
        self.identity = PodIdentity(ip=ip, namespace=pod.namespace, pod=pod.name,
                                    workload=WorkloadRef(pod.namespace, kind, name), node=pod.node,
                                    labels=dict(pod.labels), ready=pod.ready)


def _rank(owner: Owner) -> tuple[bool, int, str]:
    return (not owner.terminating, owner.start_ms, owner.uid)


def _pod_ips(pod: pb.Pod) -> list[str]:
    return [ip for ip in pod.ips if ip] or ([pod.ip] if pod.ip else [])


@dataclass(slots=True)
class Changes:
    """What an update changed: IPs whose owner changed, ClusterIPs whose service changed."""

    ips: set[str] = field(default_factory=set)
    cluster_ips: set[str] = field(default_factory=set)
    full: bool = False
    config: bool = False          # a MeshConfig came with it

    def __bool__(self) -> bool:
        return bool(self.ips or self.cluster_ips or self.full)


class PodIndex:
    """Who is behind an IP, which endpoints serve a ClusterIP:port, which pods are on this node."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.resource_version = ""
        self.epoch = 0
        self.version = 0
        self.generation = 0                      # bumped on every update; cheap "did it change"
        self._pods: dict[str, pb.Pod] = {}       # uid -> pod
        self._claims: dict[str, list[Owner]] = {}  # ip -> every pod claiming it
        self._owner: dict[str, Owner] = {}       # ip -> the owner
        self._services: dict[tuple[str, str], pb.Service] = {}
        self._by_cluster_ip: dict[tuple[str, int], ServiceEntry] = {}
        self.config = pb.MeshConfig()
        self.captured_namespaces: frozenset[str] | None = None  # None: nothing known yet
        self.excluded_namespaces: frozenset[str] = frozenset()
        self.opaque_ports: tuple[int, ...] = ()

    # ------------------------------------------------------------------ lookups (hot path)
    def owner(self, ip: str) -> Owner | None:
        return self._owner.get(ip)

    def peer_labels(self, ip: str) -> PeerLabels:
        """(namespace, kind, name, pod) for metric labels; an unknown IP is kind `unknown`, name = IP."""
        owner = self._owner.get(ip)
        return unknown_labels(ip) if owner is None else owner.labels

    def resolve(self, ip: str, at_ms: int) -> Owner | None:
        """The pod that owned `ip` at `at_ms` (epoch ms, this agent's clock), as far as we know."""
        owner = self._owner.get(ip)
        if owner is None:
            return None
        if owner.start_ms and owner.start_ms > at_ms + START_SLACK_MS:
            # The owner we know started after that moment: the address was someone else's then.
            for other in self._claims.get(ip, ()):
                if other is not owner and (not other.start_ms or other.start_ms <= at_ms + START_SLACK_MS):
                    return other
            return None
        return owner

    def claims(self, ip: str, uid: str) -> bool:
        """Does the pod `uid` (still) claim `ip`?"""
        return any(o.uid == uid for o in self._claims.get(ip, ()))

    def service_endpoints(self, ip: str, port: int) -> list[tuple[str, int]] | None:
        """None if ip:port is not a known ClusterIP:port; else its READY endpoints (shared list: don't mutate)."""
        entry = self._by_cluster_ip.get((ip, port))
        return None if entry is None else entry.ready_endpoints

    def service_of(self, ip: str, port: int) -> str:
        entry = self._by_cluster_ip.get((ip, port))
        return "" if entry is None else entry.name

    def is_local_pod(self, ip: str) -> bool:
        owner = self._owner.get(ip)
        return owner is not None and owner.local

    def uncaptured(self, namespace: str) -> bool:
        """Is this namespace excluded from capture (configured so, or missing from the captured
        list the controller sent)? Unknown peers (no namespace): no."""
        if not namespace:
            return False
        captured = self.captured_namespaces
        return namespace in self.excluded_namespaces or (captured is not None and namespace not in captured)

    # ------------------------------------------------------------------ derived views
    def local_excluded_ips(self) -> list[str]:
        """IPs of this node's pods whose namespace is excluded from capture (served on /capture)."""
        return sorted(ip for ip, o in self._owner.items() if o.local and self.uncaptured(o.labels[0]))

    def __len__(self) -> int:
        return len(self._owner)

    def known_uids(self) -> dict[str, str]:
        """ip -> uid of its owner (the admin /identity endpoint, benchmarks)."""
        return {ip: o.uid for ip, o in self._owner.items()}

    def snapshot(self) -> pb.IdentitySnapshot:
        """Everything held, as a full snapshot (for a worker attached later, or one that resyncs)."""
        snap = pb.IdentitySnapshot(resource_version=self.resource_version, epoch=self.epoch, version=self.version)
        snap.pods.extend(self._pods.values())
        snap.services.extend(self._services.values())
        snap.config.CopyFrom(self.config)
        snap.captured_namespaces.extend(sorted(self.captured_namespaces or ()))
        return snap

    # ------------------------------------------------------------------ updates
    def update(self, message: pb.IdentitySnapshot | pb.IdentityDelta | pb.ControllerMessage | ClusterObjects
               | bytes) -> Changes:
        """Apply a snapshot or delta (a message, a ControllerMessage holding one, snapshot bytes,
        or recorded objects). Raises IdentityGap for a delta that does not fit what we hold."""
        if isinstance(message, bytes):
            message = pb.IdentitySnapshot.FromString(message)
        elif isinstance(message, ClusterObjects):
            message = snapshot_from_objects(message)
        elif isinstance(message, pb.ControllerMessage):
            which = message.WhichOneof("msg")
            message = message.identity if which == "identity" else message.identity_delta
        if isinstance(message, pb.IdentityDelta):
            return self._apply_delta(message)
        return self._apply_snapshot(message)

    def _apply_snapshot(self, snap: pb.IdentitySnapshot) -> Changes:
        before = {ip: (o.uid, o.labels) for ip, o in self._owner.items()}
        old_services = dict(self._services)
        self._pods = {}
        self._claims = {}
        self._owner = {}
        for p in snap.pods:
            self._add_pod(p, None)
        self._services = {}
        self._by_cluster_ip = {}
        changes = Changes(full=True, config=True)
        for s in snap.services:
            self._add_service(s, None)
        after = {ip: (o.uid, o.labels) for ip, o in self._owner.items()}
        changes.ips = {ip for ip in before.keys() | after.keys() if before.get(ip) != after.get(ip)}
        for key in old_services.keys() | self._services.keys():
            old, new = old_services.get(key), self._services.get(key)
            if old != new:
                changes.cluster_ips.update(s.cluster_ip for s in (old, new) if s is not None and s.cluster_ip)
        self._set_config(snap.config)
        self.captured_namespaces = frozenset(snap.captured_namespaces) or None  # empty: not told
        self.resource_version = snap.resource_version
        self.epoch, self.version = snap.epoch, snap.version
        self.generation += 1
        return changes

    def _apply_delta(self, delta: pb.IdentityDelta) -> Changes:
        if delta.epoch != self.epoch or delta.base_version != self.version or not self.epoch:
            raise IdentityGap(f"delta {delta.epoch}:{delta.base_version}->{delta.version} on "
                              f"{self.epoch}:{self.version}")
        changes = Changes()
        for uid in delta.removed_pods:
            self._remove_pod(uid, changes)
        for p in delta.pods:
            self._remove_pod(p.uid or f"{p.namespace}/{p.name}", changes)
            self._add_pod(p, changes)
        for r in delta.removed_services:
            self._remove_service((r.namespace, r.name), changes)
        for s in delta.services:
            self._remove_service((s.namespace, s.name), changes)
            self._add_service(s, changes)
        if delta.HasField("config"):
            self._set_config(delta.config)
            changes.config = True
        if delta.namespaces_changed:
            self.captured_namespaces = frozenset(delta.captured_namespaces) or None
        self.version = delta.version
        self.generation += 1
        return changes

    def _set_config(self, config: pb.MeshConfig) -> None:
        self.config = pb.MeshConfig()
        self.config.CopyFrom(config)
        self.excluded_namespaces = frozenset(config.excluded_namespaces)
        self.opaque_ports = tuple(config.opaque_ports)

    def _add_pod(self, p: pb.Pod, changes: Changes | None) -> None:
        uid = p.uid or f"{p.namespace}/{p.name}"
        self._pods[uid] = p
        for ip in _pod_ips(p):
            claims = self._claims.setdefault(ip, [])
            claims.append(Owner(p, ip, self.node))
            self._elect(ip, changes)

    def _remove_pod(self, uid: str, changes: Changes) -> None:
        p = self._pods.pop(uid, None)
        if p is None:
            return
        for ip in _pod_ips(p):
            claims = [o for o in self._claims.get(ip, ()) if o.uid != uid]
            if claims:
                self._claims[ip] = claims
            else:
                self._claims.pop(ip, None)
            self._elect(ip, changes)

    def _elect(self, ip: str, changes: Changes | None) -> None:
        claims = self._claims.get(ip)
        old = self._owner.get(ip)
        new = max(claims, key=_rank) if claims else None
        if new is None:
            self._owner.pop(ip, None)
        else:
            self._owner[ip] = new
        if changes is None:
            return
        if (old is None) != (new is None) or (
                old is not None and new is not None and (old.uid, old.labels) != (new.uid, new.labels)):
            changes.ips.add(ip)

    def _add_service(self, s: pb.Service, changes: Changes | None) -> None:
        self._services[(s.namespace, s.name)] = s
        if not s.cluster_ip or s.cluster_ip == "None":
            return
        ready = [e.ip for e in s.endpoints if e.ready and e.ip]
        for sp in s.ports:
            target = sp.target_port or sp.port
            self._by_cluster_ip[(s.cluster_ip, sp.port)] = ServiceEntry(
                f"{s.name}.{s.namespace}", [(ip, target) for ip in ready])
        if changes is not None:
            changes.cluster_ips.add(s.cluster_ip)

    def _remove_service(self, key: tuple[str, str], changes: Changes) -> None:
        s = self._services.pop(key, None)
        if s is None or not s.cluster_ip:
            return
        for sp in s.ports:
            self._by_cluster_ip.pop((s.cluster_ip, sp.port), None)
        changes.cluster_ips.add(s.cluster_ip)

"""The agent's IP -> workload index, and Service ClusterIP -> ready endpoints.

Fed by IdentitySnapshots (from the controller, or built from the sandbox's recorded objects by
`agent.identity`). Lookups are plain dict reads because the traffic path calls them once per
connection. An update builds fresh dicts and swaps them in, so a lookup never sees half an update.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nodemesh.api.clusterstate import ClusterObjects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import UNKNOWN_KIND, UNKNOWN_NAMESPACE, PodIdentity, WorkloadRef

# Who a peer is, as the metric labels spell it: (namespace, kind, name, pod).
PeerLabels = tuple[str, str, str, str]


@dataclass(slots=True)
class ServiceEntry:
    name: str                                    # "name.namespace"
    ready_endpoints: list[tuple[str, int]] = field(default_factory=list)


class PodIndex:
    """Who is behind an IP, which endpoints serve a ClusterIP:port, which pods are on this node."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.resource_version = ""
        self._pods: dict[str, PodIdentity] = {}
        self._labels: dict[str, PeerLabels] = {}
        self._services: dict[tuple[str, int], ServiceEntry] = {}
        self._local: frozenset[str] = frozenset()
        self.excluded_namespaces: frozenset[str] = frozenset()
        self.opaque_ports: tuple[int, ...] = ()
        self.generation = 0                      # bumped on every update; cheap "did it change"

    # ------------------------------------------------------------------ lookups (hot path)
    def lookup(self, ip: str) -> PodIdentity | None:
        return self._pods.get(ip)

    def peer_labels(self, ip: str) -> PeerLabels:
        """(namespace, kind, name, pod) for metric labels; an unknown IP is kind `unknown`, name = IP."""
        labels = self._labels.get(ip)
        if labels is None:
            return (UNKNOWN_NAMESPACE, UNKNOWN_KIND, ip, "")
        return labels

    def service_endpoints(self, ip: str, port: int) -> list[tuple[str, int]] | None:
        """None if ip:port is not a known ClusterIP:port; else its READY endpoints (shared list: don't mutate)."""
        entry = self._services.get((ip, port))
        return None if entry is None else entry.ready_endpoints

    def service_of(self, ip: str, port: int) -> str:
        entry = self._services.get((ip, port))
        return "" if entry is None else entry.name

    def is_local_pod(self, ip: str) -> bool:
        return ip in self._local

    # ------------------------------------------------------------------ derived views
    def local_excluded_ips(self) -> list[str]:
        """IPs of this node's pods whose namespace is excluded from capture (served on /capture)."""
        excluded = self.excluded_namespaces
        return sorted(ip for ip in self._local if self._pods[ip].namespace in excluded)

    def pods(self) -> Iterable[PodIdentity]:
        return self._pods.values()

    def __len__(self) -> int:
        return len(self._pods)

    # ------------------------------------------------------------------ updates
    def update(self, snapshot: pb.IdentitySnapshot | ClusterObjects | bytes) -> None:
        """Replace the whole index from an IdentitySnapshot (message or its bytes) or recorded objects."""
        if isinstance(snapshot, bytes):
            snapshot = pb.IdentitySnapshot.FromString(snapshot)
        elif isinstance(snapshot, ClusterObjects):
            from nodemesh.agent.identity import snapshot_from_objects  # identity imports us

            snapshot = snapshot_from_objects(snapshot)
        pods: dict[str, PodIdentity] = {}
        labels: dict[str, PeerLabels] = {}
        local: set[str] = set()
        for p in snapshot.pods:
            if not p.ip:
                continue
            owner = p.owner
            kind = owner.type or "pod"
            name = owner.name or p.name
            ident = PodIdentity(
                ip=p.ip, namespace=p.namespace, pod=p.name,
                workload=WorkloadRef(p.namespace, kind, name), node=p.node,
                labels=dict(p.labels), ready=p.ready,
            )
            pods[p.ip] = ident
            labels[p.ip] = (p.namespace, kind, name, p.name)
            if self.node and p.node == self.node:
                local.add(p.ip)
        services: dict[tuple[str, int], ServiceEntry] = {}
        for s in snapshot.services:
            if not s.cluster_ip or s.cluster_ip == "None":
                continue
            ready = [e.ip for e in s.endpoints if e.ready and e.ip]
            for sp in s.ports:
                target = sp.target_port or sp.port
                services[(s.cluster_ip, sp.port)] = ServiceEntry(
                    f"{s.name}.{s.namespace}", [(ip, target) for ip in ready]
                )
        # Swap everything at once: readers on the same loop never see a mix of old and new.
        self._pods, self._labels, self._services, self._local = pods, labels, services, frozenset(local)
        self.excluded_namespaces = frozenset(snapshot.config.excluded_namespaces)
        self.opaque_ports = tuple(snapshot.config.opaque_ports)
        self.resource_version = snapshot.resource_version
        self.generation += 1

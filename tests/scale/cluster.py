"""The scale harness's synthetic cluster: N nodes x P pods as Kubernetes API objects, and the
traffic each simulated agent reports about it.

Objects are what the sandbox records (`api/clusterstate.py`): Namespaces, Nodes, Deployments,
ReplicaSets, Pods, Services and EndpointSlices, in the API's shape, so the controller's sandbox
source reads them as it reads a real sandbox. Deployments have `REPLICAS` pods spread over the
nodes; every Deployment has a Service; every pod calls `fanout` other Deployments' Services
(one backend pod each), so each node holds outbound series for its pods' calls and inbound
series for the calls its pods receive: the peer fan-out of a microservice app.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from nodemesh.api.model import (
    LATENCY_BUCKETS_MS,
    REQUEST_TOTAL,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    TCP_OPEN_CONNECTIONS,
    TCP_READ_BYTES_TOTAL,
    TCP_WRITE_BYTES_TOTAL,
)

REPLICAS = 10
NAMESPACES = 10


@dataclass(frozen=True, slots=True)
class PodSpec:
    index: int
    namespace: str
    deployment: str
    name: str
    node: str
    ip: str
    uid: str


def _hash(s: str, n: int = 10) -> str:
    return hashlib.sha1(s.encode()).hexdigest()[:n]


class Cluster:
    def __init__(self, nodes: int, pods_per_node: int, fanout: int = 3, generation: int = 0) -> None:
        self.n_nodes = nodes
        self.pods_per_node = pods_per_node
        self.fanout = fanout
        total = nodes * pods_per_node
        self.n_deployments = max(1, total // REPLICAS)
        self.node_names = [f"node-{i:04d}" for i in range(nodes)]
        self.pods: list[PodSpec] = []
        for g in range(total):
            self.pods.append(self._pod(g, generation))
        # deployment index -> pod indexes (its replicas)
        self.replicas: dict[int, list[int]] = {}
        for g in range(total):
            self.replicas.setdefault(g % self.n_deployments, []).append(g)

    def deployment_of(self, d: int) -> tuple[str, str]:
        return f"ns-{d % NAMESPACES}", f"deploy-{d:05d}"

    def _pod(self, g: int, generation: int) -> PodSpec:
        d = g % self.n_deployments
        ns, dep = self.deployment_of(d)
        node = g // self.pods_per_node
        # 10.(64 + g / 65536).(g / 256 % 256).(g % 256); a rollout moves to another /10 half.
        base = g + generation * (1 << 21)
        ip = f"10.{64 + base // 65536}.{base // 256 % 256}.{base % 256}"
        name = f"{dep}-{_hash(dep + str(generation))}-{_hash(str(g) + str(generation), 5)}"
        return PodSpec(g, ns, dep, name, self.node_names[node], ip, f"uid-{generation}-{g}")

    def roll(self, pod_indexes: list[int], generation: int) -> None:
        """Replace these pods by new ones (new name, uid, IP): a rollout's pods."""
        for g in pod_indexes:
            self.pods[g] = self._pod(g, generation)

    # ------------------------------------------------------------------ API objects
    def objects(self) -> list[dict]:
        items: list[dict] = []
        for i in range(NAMESPACES):
            items.append({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": f"ns-{i}", "uid": f"ns-{i}", "resourceVersion": "1"}})
        for i, name in enumerate(self.node_names):
            items.append({"apiVersion": "v1", "kind": "Node",
                          "metadata": {"name": name, "uid": f"node-{i}", "resourceVersion": "1"},
                          "status": {"addresses": [{"type": "InternalIP", "address": f"10.250.{i // 256}.{i % 256}"}],
                                     "conditions": [{"type": "Ready", "status": "True"}]}})
        for d in range(self.n_deployments):
            ns, dep = self.deployment_of(d)
            rs = f"{dep}-{_hash(dep)}"
            items.append({"apiVersion": "apps/v1", "kind": "Deployment",
                          "metadata": {"name": dep, "namespace": ns, "uid": f"d-{d}", "resourceVersion": "1",
                                       "labels": {"app": dep}},
                          "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": dep}}}})
            items.append({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                          "metadata": {"name": rs, "namespace": ns, "uid": f"rs-{d}", "resourceVersion": "1",
                                       "labels": {"app": dep},
                                       "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                            "name": dep, "uid": f"d-{d}", "controller": True}]}})
            items.append({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": dep, "namespace": ns, "uid": f"svc-{d}", "resourceVersion": "1"},
                          "spec": {"clusterIP": f"10.96.{d // 256 % 256}.{d % 256}", "selector": {"app": dep},
                                   "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
            endpoints = [{"addresses": [p.ip], "conditions": {"ready": True}, "nodeName": p.node,
                          "targetRef": {"kind": "Pod", "name": p.name, "namespace": ns}}
                         for p in (self.pods[g] for g in self.replicas.get(d, []))]
            items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "metadata": {"name": f"{dep}-x", "namespace": ns, "uid": f"es-{d}", "resourceVersion": "1",
                                       "labels": {"kubernetes.io/service-name": dep}},
                          "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints})
        for p in self.pods:
            d = p.index % self.n_deployments
            rs = f"{p.deployment}-{_hash(p.deployment)}"
            items.append({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "resourceVersion": "1",
                                       "labels": {"app": p.deployment},
                                       "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                            "name": rs, "uid": f"rs-{d}", "controller": True}]},
                          "spec": {"nodeName": p.node, "containers": [{"name": "app", "ports": [
                              {"name": "http", "containerPort": 8080}]}]},
                          "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
                                     "startTime": "2026-12-01T00:00:00Z",
                                     "conditions": [{"type": "Ready", "status": "True"}]}})
        return items

    # ------------------------------------------------------------------ traffic
    def calls(self) -> list[tuple[int, int]]:
        """(caller pod, callee pod) pairs: every pod calls `fanout` other deployments, one backend each."""
        out = []
        D = self.n_deployments
        for p in self.pods:
            d = p.index % D
            for k in range(self.fanout):
                target = (d * 7 + 13 * (k + 1)) % D
                if target == d:
                    target = (target + 1) % D
                reps = self.replicas[target]
                out.append((p.index, reps[(p.index + k) % len(reps)]))
        return out


def pairs_by_node(cluster: Cluster, pairs: list[tuple[int, int]]) -> dict[str, list[tuple[int, int]]]:
    """Each node's pairs (a pod of the node calls or is called), in `pairs`' order: what NodeTraffic
    needs of them, found once for all nodes instead of a walk over every pair per node."""
    out: dict[str, list[tuple[int, int]]] = {}
    for pair in pairs:
        src, dst = cluster.pods[pair[0]].node, cluster.pods[pair[1]].node
        out.setdefault(src, []).append(pair)
        if dst != src:
            out.setdefault(dst, []).append(pair)
    return out


def peer_labels(cluster: Cluster, direction: str, src: int, dst: int) -> dict[str, str]:
    s, d = cluster.pods[src], cluster.pods[dst]
    svc = f"{d.deployment}.{d.namespace}"
    return {"direction": direction, "src_namespace": s.namespace, "src_kind": "deployment",
            "src_name": s.deployment, "src_pod": s.name, "dst_namespace": d.namespace,
            "dst_kind": "deployment", "dst_name": d.deployment, "dst_pod": d.name,
            "dst_service": svc, "authority": f"{svc}.svc.cluster.local:80", "protocol": "http"}


class NodeTraffic:
    """What one node's agent counts: every pair with a pod of this node as caller (outbound) or
    callee (inbound). Each interval a pair is active with probability `active` and then sees
    a few requests; the agent reports only the series that changed (increments), plus its gauges."""

    def __init__(self, cluster: Cluster, node: str, pairs: list[tuple[int, int]], active: float,
                 seed: int) -> None:
        self.rng = random.Random(seed)
        self.active = active
        self.series: list[dict[str, str]] = []
        for src, dst in pairs:
            if cluster.pods[src].node == node:
                self.series.append(peer_labels(cluster, "outbound", src, dst))
            if cluster.pods[dst].node == node:
                self.series.append(peer_labels(cluster, "inbound", src, dst))

    VARIANTS = 5

    def encoded_intervals(self, pb, refs: bool, columns: bool = False) -> tuple[bytes, list[bytes]]:
        """The node's report series, encoded once (the harness must not drown the machine it
        measures): (the first report's series, defining every ref when `refs`), and
        `VARIANTS` intervals' series that the agent cycles through. Each interval holds the
        pairs active in it (5 series each: requests, responses, latency histogram, bytes read
        and written) and every gauge, as a live report does (with refs: gauges that changed;
        with `columns`, when the controller takes them: series already ref'd as packed columns)."""
        table: dict | None = {} if refs else None
        first = self._encode(pb, table, active=1.0, gauges=True, columns=columns)
        # With refs, an unchanged gauge is not sent again (agent/seriesrefs.py).
        variants = [self._encode(pb, table, self.active, gauges=not refs, columns=columns)
                    for _ in range(self.VARIANTS)]
        return first, variants

    def _encode(self, pb, table: dict | None, active: float, gauges: bool, columns: bool = False) -> bytes:
        rng = self.rng
        n_lat = len(LATENCY_BUCKETS_MS) + 1  # + the +Inf bucket
        out = []
        for i, labels in enumerate(self.series):
            if rng.random() >= active:
                continue
            n = rng.randint(1, 5)
            buckets = [0] * n_lat
            buckets[rng.randint(3, 11)] = n
            out.append(self._series(pb, table, REQUEST_TOTAL, i, labels, value=float(n)))
            out.append(self._series(pb, table, RESPONSE_TOTAL, i, labels, value=float(n), response=True))
            out.append(self._series(pb, table, RESPONSE_LATENCY_MS, i, labels, bucket_counts=buckets,
                                    sum=12.0 * n))
            out.append(self._series(pb, table, TCP_READ_BYTES_TOTAL, i, labels, value=300.0 * n))
            out.append(self._series(pb, table, TCP_WRITE_BYTES_TOTAL, i, labels, value=900.0 * n))
        if gauges:
            out += [self._series(pb, table, TCP_OPEN_CONNECTIONS, i, labels, value=1.0)
                    for i, labels in enumerate(self.series)]
        if columns:  # as agent/seriesrefs.py sends them: ref'd series leave `series` for columns
            from nodemesh.api.columns import Columns
            cols, kept = Columns(), []
            for s in out:
                if s.labels or not s.ref:
                    kept.append(s)
                elif s.bucket_counts:
                    cols.hist_refs.append(s.ref)
                    cols.hist_sums.append(s.sum)
                    cols.hist_counts.extend(s.bucket_counts)
                else:
                    cols.refs.append(s.ref)
                    cols.values.append(s.value)
            return pb.MetricsReport(series=kept, columns=cols.to_proto() if cols else None).SerializeToString()
        return pb.MetricsReport(series=out).SerializeToString()

    @staticmethod
    def _series(pb, refs: dict | None, name: str, i: int, labels: dict, response: bool = False, **values):
        """One series as the agent link sends it: with its labels, or (series refs,
        agent/seriesrefs.py) labels and a new ref the first time on a stream, the ref after."""
        if response:
            labels = dict(labels, status_code="200", grpc_status="", classification="success", error="")
        if refs is None:
            return pb.Series(name=name, labels=labels, **values)
        ref = refs.get((name, i))
        if ref is not None:
            return pb.Series(name=name, ref=ref, **values)
        ref = refs[(name, i)] = len(refs) + 1
        return pb.Series(name=name, labels=labels, ref=ref, **values)

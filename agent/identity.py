"""Cluster objects (as the Kubernetes API returns them) -> IdentitySnapshot.

Used by the agent when it runs without a controller (the sandbox's recorded `objects.json`), in
the same shape the controller pushes, so the index has one input format. Owner resolution and
which pods carry an identity: `nodemesh.api.workloads`, shared with the controller. Services get
their ready endpoints from EndpointSlices, else Endpoints, else (no endpoint objects recorded at
all) from their selector over ready pods.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodemesh.api.clusterstate import ClusterObjects, objects_path
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.workloads import (
    namespace_capture_disabled,
    pod_has_identity,
    pod_ips,
    pod_ready,
    pod_start_ms,
    pod_terminating,
    pod_uid,
    resolve_owner,
)

log = logging.getLogger("nodemesh.agent.identity")

Obj = dict[str, Any]


def _meta(o: Obj) -> Obj:
    return o.get("metadata") or {}


def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def snapshot_from_objects(objects: ClusterObjects) -> pb.IdentitySnapshot:
    """Build the IdentitySnapshot a controller would push, from recorded cluster objects."""
    snap = pb.IdentitySnapshot(resource_version=str(objects.resource_version))
    excluded = sorted(_meta(n).get("name", "") for n in objects.of_kind("Namespace") if namespace_capture_disabled(n))
    snap.config.excluded_namespaces.extend(excluded)
    snap.captured_namespaces.extend(
        sorted(_meta(n).get("name", "") for n in objects.of_kind("Namespace") if not namespace_capture_disabled(n))
    )
    replicasets = {(_meta(r).get("namespace", "default"), _meta(r).get("name", "")): r
                   for r in objects.of_kind("ReplicaSet")}
    pods = objects.of_kind("Pod")
    by_ip: dict[str, Obj] = {}
    for pod in pods:
        m, spec = _meta(pod), pod.get("spec") or {}
        # Host-network pods' IPs are their nodes'; finished (or stopped terminating) pods may have
        # handed theirs on: api.workloads.pod_has_identity, as the controller decides.
        if not pod_has_identity(pod):
            continue
        ips = pod_ips(pod)
        owner = resolve_owner(pod, lambda kind, ns, name: replicasets.get((ns, name)) if kind == "ReplicaSet" else None)
        ns = m.get("namespace", "default")
        for ip in ips:
            by_ip[ip] = pod
        snap.pods.append(pb.Pod(
            ip=ips[0], ips=ips, namespace=ns, name=m.get("name", ""), node=spec.get("nodeName", ""),
            owner=pb.Resource(namespace=ns, type=owner.kind, name=owner.name),
            labels=m.get("labels") or {}, ready=pod_ready(pod), uid=pod_uid(pod),
            start_time_ms=pod_start_ms(pod), terminating=pod_terminating(pod),
        ))

    slices: dict[tuple[str, str], list[Obj]] = {}
    for s in objects.of_kind("EndpointSlice"):
        svc = (_meta(s).get("labels") or {}).get("kubernetes.io/service-name")
        if svc:
            slices.setdefault((_meta(s).get("namespace", "default"), svc), []).append(s)
    endpoints = {(_meta(e).get("namespace", "default"), _meta(e).get("name", "")): e
                 for e in objects.of_kind("Endpoints")}

    for svc in objects.of_kind("Service"):
        m, spec = _meta(svc), svc.get("spec") or {}
        ns, name = m.get("namespace", "default"), m.get("name", "")
        out = pb.Service(namespace=ns, name=name, cluster_ip=spec.get("clusterIP", "") or "")
        named_ports: dict[str, int] = {}
        eps: list[pb.Endpoint] = []
        if (ns, name) in slices:
            for sl in slices[(ns, name)]:
                for p in sl.get("ports") or []:
                    if p.get("name") is not None and p.get("port"):
                        named_ports[p.get("name") or ""] = int(p["port"])
                for ep in sl.get("endpoints") or []:
                    ready = (ep.get("conditions") or {}).get("ready", True) is not False
                    ref = ep.get("targetRef") or {}
                    for ip in ep.get("addresses") or []:
                        eps.append(pb.Endpoint(ip=ip, ready=ready, pod=ref.get("name", ""),
                                               node=ep.get("nodeName", "")))
        elif (ns, name) in endpoints:
            for subset in endpoints[(ns, name)].get("subsets") or []:
                for p in subset.get("ports") or []:
                    if p.get("port"):
                        named_ports[p.get("name") or ""] = int(p["port"])
                for ready, key in ((True, "addresses"), (False, "notReadyAddresses")):
                    for a in subset.get(key) or []:
                        eps.append(pb.Endpoint(ip=a.get("ip", ""), ready=ready,
                                               pod=(a.get("targetRef") or {}).get("name", ""),
                                               node=a.get("nodeName", "")))
        else:
            selector = spec.get("selector") or {}
            for pod in pods:
                pm = _meta(pod)
                if pm.get("namespace", "default") != ns or not _selector_matches(selector, pm.get("labels") or {}):
                    continue
                pod_ip = (pod.get("status") or {}).get("podIP")
                if pod_ip and by_ip.get(pod_ip) is pod:
                    eps.append(pb.Endpoint(ip=pod_ip, ready=pod_ready(pod), pod=pm.get("name", ""),
                                           node=(pod.get("spec") or {}).get("nodeName", "")))
        out.endpoints.extend(eps)
        for p in spec.get("ports") or []:
            port = int(p.get("port", 0))
            target = p.get("targetPort", port)
            if isinstance(target, str):
                target = named_ports.get(p.get("name") or "", 0) or _named_pod_port(target, eps, by_ip) or port
            out.ports.append(pb.ServicePort(name=p.get("name", "") or "", port=port, target_port=int(target)))
        snap.services.append(out)
    return snap


def _named_pod_port(port_name: str, eps: list[pb.Endpoint], by_ip: dict[str, Obj]) -> int:
    """A Service's named targetPort, resolved from the first endpoint pod's container ports."""
    for ep in eps:
        pod = by_ip.get(ep.ip)
        for c in ((pod or {}).get("spec") or {}).get("containers") or []:
            for cp in c.get("ports") or []:
                if cp.get("name") == port_name and cp.get("containerPort"):
                    return int(cp["containerPort"])
    return 0


class IdentityFileSource:
    """Polls the sandbox's objects.json and hands a fresh snapshot to `on_snapshot` on every change."""

    def __init__(self, state_dir: str, on_snapshot: Callable[[pb.IdentitySnapshot], object],
                 poll_s: float = 0.5) -> None:
        # identity_file names the sandbox state dir (holding objects.json) or the file itself.
        self._path: Path = Path(state_dir) if state_dir.endswith(".json") else objects_path(state_dir)
        self._on_snapshot = on_snapshot
        self._poll_s = poll_s
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load_once(self) -> bool:
        """Reload if the file changed (mtime or size); True when a snapshot was delivered."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        try:
            data = json.loads(self._path.read_text())
            objects = ClusterObjects(int(data.get("resourceVersion", "0")), list(data.get("items", [])))
        except (ValueError, OSError) as exc:  # written atomically, but be safe against a torn copy
            log.warning("event=identity_read_failed path=%s error=%r", self._path, exc)
            return False
        self._seen = stamp
        self._on_snapshot(snapshot_from_objects(objects))
        log.debug("event=identity_reloaded path=%s rv=%s", self._path, objects.resource_version)
        return True

    async def run(self) -> None:
        while True:
            self.load_once()
            await asyncio.sleep(self._poll_s)

    def start(self) -> None:
        self.load_once()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

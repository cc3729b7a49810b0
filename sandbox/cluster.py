"""`Sandbox`: the Python API of a local cluster made of network namespaces.

    sb = Sandbox("t1")            # name: 1-12 lowercase letters/digits; default "nodemesh"
    sb.up(nodes=2, cni="bridge")  # idempotent
    sb.apply("app.yaml"); sb.wait_ready()
    sb.exec("default", pod, ["curl", "-s", "web"])
    sb.down()                     # idempotent, also after a crash half-way

`apply` plays API server, scheduler, ReplicaSet controller, IPAM and CNI: it validates every
document first, then records the objects and wires pod netns under the state lock. The kubelet
daemon (kubelet.py) runs the processes, probes readiness and keeps Services working.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodemesh.api import clusterstate
from nodemesh.sandbox import cgroups, kubeproxy, naming, netlink, objects
from nodemesh.sandbox.addressing import AddressPlan, allocate
from nodemesh.sandbox.manifests import Manifest, ManifestError, load_file, load_text
from nodemesh.sandbox.netlink import NodeInfo
from nodemesh.sandbox.proctools import alive, cmdline, kill_all, pids_in_netns
from nodemesh.sandbox.state import (
    DEFAULT_STATE_ROOT,
    ClusterState,
    Objects,
    allocate_index,
    lookup_index,
    read_json,
    release_index,
)

log = logging.getLogger("nodemesh.sandbox")

CNI_STYLES = ("bridge", "routed")
KIND_LABELS = {"Namespace": "namespace", "Deployment": "deployment.apps", "DaemonSet": "daemonset.apps",
               "Service": "service", "ConfigMap": "configmap", "ServiceAccount": "serviceaccount",
               "ClusterRole": "clusterrole.rbac.authorization.k8s.io",
               "ClusterRoleBinding": "clusterrolebinding.rbac.authorization.k8s.io",
               "Role": "role.rbac.authorization.k8s.io", "RoleBinding": "rolebinding.rbac.authorization.k8s.io",
               "Secret": "secret"}
RECORDED_KINDS = ("ConfigMap", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Secret")
# On an old DaemonSet pod: the pod replacing it; the kubelet deletes the old one once that one is Ready.
REPLACED_BY = "sandbox.nodemesh.io/replaced-by"
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class SandboxError(RuntimeError):
    """A sandbox operation failed; the message is one line for the user."""


class Sandbox:
    def __init__(self, name: str = naming.DEFAULT_CLUSTER, state_root: str | Path = DEFAULT_STATE_ROOT) -> None:
        self.name = naming.check_cluster_name(name)
        self.state_root = Path(state_root)
        self.state = ClusterState(self.state_root / self.name)

    # ------------------------------------------------------------------------- properties
    @property
    def state_dir(self) -> Path:
        return self.state.dir

    @property
    def index(self) -> int:
        idx = self.state.infra().get("index")
        if idx is None:
            raise SandboxError(f"sandbox {self.name} is not up")
        return int(idx)

    @property
    def plan(self) -> AddressPlan:
        return AddressPlan(self.index)

    @property
    def host_ip(self) -> str:
        """The root namespace's address on the sandbox underlay."""
        return self.plan.host_ip

    @property
    def host_link(self) -> str:
        return naming.host_link(self.index)

    @property
    def controller_address(self) -> str:
        """Where a controller run with start_node_process(node1, ...) is reachable from the host."""
        return self.nodes()[0].ip

    def exists(self) -> bool:
        return self.state.exists()

    def is_up(self) -> bool:
        infra = self.state.infra()
        if infra.get("phase") != "up":
            return False
        if not self._kubelet_alive():
            return False
        return all(netlink.netns_exists(n["netns"]) for n in infra["nodes"])

    # ------------------------------------------------------------------------- up / down
    def up(self, nodes: int = 2, cni: str = "bridge", backoff: tuple[float, float] = (10.0, 300.0),
           node_backoff: tuple[float, float] = (1.0, 10.0), iptables: str | dict[str, str] | None = None) -> bool:
        """Create the cluster. Returns False if it was already up (not an error).

        `iptables`: each node's iptables backend, where its kube-proxy rules live ("nft" or
        "legacy", or {"node2": "legacy"} per node; default: what `iptables` on this machine is)."""
        if cni not in CNI_STYLES:
            raise SandboxError(f"unknown CNI style {cni!r}: use bridge or routed")
        if not 1 <= nodes <= 16:
            raise SandboxError("--nodes must be between 1 and 16")
        backends = _node_backends(iptables, nodes)
        if self.is_up():
            return False
        if self.exists() or netlink.list_cluster_netns(self.name):
            self.down()  # half-made by a crash: start from nothing
        t0 = time.monotonic()
        index = allocate_index(self.state_root, self.name)
        plan = AddressPlan(index)
        self.state.dir.mkdir(parents=True, exist_ok=True)
        ks = list(range(1, nodes + 1))
        infra: dict[str, Any] = {
            "name": self.name, "index": index, "cni": cni, "phase": "creating", "nodes": [],
            "backoff": list(backoff), "node_backoff": list(node_backoff), "node_processes": {},
            "host_link": naming.host_link(index), "host_ip": plan.host_ip,
        }
        self._write_infra(infra)  # first, so `down` can undo a crash in the middle
        try:
            netlink.create_underlay(self.name, plan)
            infos = [netlink.create_node(self.name, plan, k, cni, ks, backends[naming.node_name(k)]) for k in ks]
            for info in infos:
                self._iptables_restore(info.netns, kubeproxy.base_jumps() + kubeproxy.render([]), info.iptables)
            infra["nodes"] = [i.to_json() for i in infos]
            self._write_infra(infra)
            with self.state.objects_txn() as objs:
                for ns in BUILTIN_NAMESPACES:
                    objs.put(objects.namespace_object(ns))
                for info in infos:
                    objs.put(objects.node_object(info))
            self._start_kubelet()
            infra["phase"] = "up"
            self._write_infra(infra)
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        log.info("event=sandbox_up name=%s nodes=%d cni=%s seconds=%.2f", self.name, nodes, cni,
                 time.monotonic() - t0)
        return True

    def down(self) -> None:
        """Remove every namespace, link, process and file of this cluster. Idempotent."""
        infra = self.state.infra()
        index = infra.get("index")
        if index is None:
            index = lookup_index(self.state_root, self.name)
        self._stop_kubelet()
        names = netlink.list_cluster_netns(self.name)
        inodes = {i for n in names if (i := netlink.netns_inode(n)) is not None}
        runtime = read_json(self.state.runtime_file, {})
        pids = set(pids_in_netns(inodes))
        pids.update(p for p in runtime.get("pids", {}).values() if alive(p) and _same_netns_any(p, inodes))
        kill_all(sorted(pids), grace=2.0)
        for n in sorted(names, key=lambda x: "-pod-" not in x):  # pods, then nodes, then underlay
            netlink.remove_netns(n)
        if index is not None:
            netlink.remove_host_link(int(index))
        etc = Path("/etc/netns")
        if etc.is_dir():
            for d in etc.iterdir():
                if d.name.startswith(naming.netns_prefix(self.name)):
                    shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.state.dir, ignore_errors=True)
        cgroups.remove_tree(cgroups.cluster_cgroup(self.name))
        cgroups.remove_bpf_dirs(self.name)
        release_index(self.state_root, self.name)

    # ------------------------------------------------------------------------- kubelet
    def _start_kubelet(self) -> None:
        self._stop_kubelet()
        with open(self.state.dir / "kubelet.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nodemesh.sandbox.kubelet", "--cluster", self.name,
                 "--state-root", str(self.state_root)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                cwd="/",
            )
        self.state.kubelet_pid_file.write_text(str(proc.pid))

    def _kubelet_pid(self) -> int | None:
        try:
            pid = int(self.state.kubelet_pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        args = cmdline(pid)
        # pids get reused: only a kubelet of *this* cluster is ours
        if alive(pid) and "nodemesh.sandbox.kubelet" in args and self.name in args:
            return pid
        return None

    def _kubelet_alive(self) -> bool:
        return self._kubelet_pid() is not None

    def _stop_kubelet(self) -> None:
        pid = self._kubelet_pid()
        if pid is not None:
            kill_all([pid], grace=4.0)

    # ------------------------------------------------------------------------- apply / delete
    def apply(self, path: str | Path | None = None, text: str | None = None, keep_old: bool = False) -> list[str]:
        """Create or update every document of a file (or YAML text). Returns kubectl-style lines.
        Raises ManifestError / SandboxError before changing anything when any document is bad.
        keep_old: a changed template leaves the old ReplicaSet's pods running (the surge half of a
        rolling update; sandbox/lifecycle.py's rollout terminates them gracefully after)."""
        manifests = load_text(text, "<text>") if text is not None else load_file(str(path))
        self._require_up()
        infra = self.state.infra()
        nodes = [NodeInfo.from_json(n) for n in infra["nodes"]]
        plan = AddressPlan(infra["index"])
        created_pods: list[tuple[NodeInfo, str, str]] = []
        removed_pods: list[dict[str, Any]] = []
        messages: list[str] = []
        try:
            with self.state.objects_txn() as objs:
                self._check_against_state(objs, manifests)
                order = {"Namespace": 0, "ConfigMap": 1, "Secret": 1, "ServiceAccount": 1, "ClusterRole": 1,
                         "ClusterRoleBinding": 1, "Role": 1, "RoleBinding": 1, "Service": 2}
                for m in sorted(manifests, key=lambda m: order.get(m.kind, 3)):
                    if m.kind == "Namespace":
                        messages.append(self._apply_namespace(objs, m))
                    elif m.kind == "Service":
                        messages.append(self._apply_service(objs, m, plan))
                    elif m.kind in RECORDED_KINDS:
                        messages.append(self._apply_recorded(objs, m))
                    else:
                        if m.kind == "Deployment":
                            msg, made, gone = self._apply_deployment(objs, m, nodes, plan, keep_old)
                        else:
                            msg, made, gone = self._apply_daemonset(objs, m, nodes, plan)
                        messages.append(msg)
                        created_pods += made
                        removed_pods += gone
                objects.derive(objs)
        except BaseException:
            for node, ns, pod in created_pods:  # the objects were not written: undo the wiring
                with contextlib.suppress(Exception):
                    netlink.detach_pod(self.name, node, ns, pod)
            raise
        self._cleanup_pods(removed_pods, nodes)
        return messages

    def _check_against_state(self, objs: Objects, manifests: list[Manifest]) -> None:
        namespaces = {o["metadata"]["name"] for o in objs.list("Namespace")}
        namespaces |= {m.name for m in manifests if m.kind == "Namespace"}
        used_ips = {s["spec"]["clusterIP"]: s for s in objs.list("Service")}
        for m in manifests:
            if m.namespace and m.namespace not in namespaces:
                raise ManifestError(f"{m.kind} {m.namespace}/{m.name}: namespaces \"{m.namespace}\" not found")
            if m.kind == "Service" and m.body["spec"].get("clusterIP"):
                ip = m.body["spec"]["clusterIP"]
                if ip not in {str(a) for a in self.plan.service_cidr}:
                    raise ManifestError(f"Service {m.namespace}/{m.name}: clusterIP {ip} is outside "
                                        f"{self.plan.service_cidr}")
                owner = used_ips.get(ip)
                if owner is not None and (owner["metadata"]["namespace"], owner["metadata"]["name"]) != (
                        m.namespace, m.name):
                    raise ManifestError(f"Service {m.namespace}/{m.name}: clusterIP {ip} is already allocated")

    def _apply_namespace(self, objs: Objects, m: Manifest) -> str:
        existing = objs.get("Namespace", "", m.name)
        obj = objects.namespace_object(m.name, m.body["metadata"].get("labels"))
        if m.body["metadata"].get("annotations"):
            obj["metadata"]["annotations"] = dict(m.body["metadata"]["annotations"])
        stored = objs.put(obj)
        return _verb(f"namespace/{m.name}", existing, stored)

    def _apply_service(self, objs: Objects, m: Manifest, plan: AddressPlan) -> str:
        existing = objs.get("Service", m.namespace, m.name)
        ip = m.body["spec"].get("clusterIP")
        if not ip:
            if existing is not None:
                ip = existing["spec"]["clusterIP"]
            else:
                used = {s["spec"]["clusterIP"] for s in objs.list("Service")}
                ip = allocate(plan.service_ip_candidates(), used)
        stored = objs.put(objects.service_object(m.body, ip))
        return _verb(f"service/{m.name}", existing, stored)

    def _apply_recorded(self, objs: Objects, m: Manifest) -> str:
        existing = objs.get(m.kind, m.namespace, m.name)
        body = objects.recorded_object(m.body)
        if existing is not None and m.kind in ("ConfigMap", "Secret") and "data" not in m.body and "data" in existing:
            # `kubectl apply` leaves what the manifest never set: the data a controller wrote into
            # the object the install created empty (the controller's TLS Secret and CA ConfigMap).
            body["data"] = existing["data"]
        stored = objs.put(body)
        return _verb(f"{KIND_LABELS[m.kind]}/{m.name}", existing, stored)

    def _new_pod(self, objs: Objects, plan: AddressPlan, node: NodeInfo, namespace: str, owner_name: str,
                 host_network: bool, made: list[tuple[NodeInfo, str, str]],
                 forced: str | None = None) -> tuple[str, str]:
        """Name and IP (`forced`, else the next free one) for a new pod on `node`, its netns wired
        (unless it uses the node's network)."""
        name = self._pod_name(objs, namespace, owner_name)
        if host_network:
            return name, node.ip
        used = {objects.pod_ip(p) for p in objs.list("Pod")
                if p["spec"]["nodeName"] == node.name and not p["spec"].get("hostNetwork")}
        if forced and forced in used:
            raise ManifestError(f"{namespace}/{owner_name}: pod IP {forced} is in use")
        ip = forced or allocate(plan.pod_ip_candidates(node.index), used)
        netlink.attach_pod(self.name, plan, node, namespace, name, ip)
        made.append((node, namespace, name))
        return name, ip

    def _apply_daemonset(self, objs: Objects, m: Manifest, nodes: list[NodeInfo], plan: AddressPlan,
                         ) -> tuple[str, list[tuple[NodeInfo, str, str]], list[dict[str, Any]]]:
        """One pod per matching node. A changed template rolls: with maxSurge >= 1 the new pod
        starts beside the old one, and the kubelet deletes the old one once the new one is Ready
        (every node at once; Kubernetes goes node by node); otherwise the old pod goes first."""
        existing = objs.get("DaemonSet", m.namespace, m.name)
        ds = objs.put(objects.daemonset_object(m.body, copy.deepcopy(existing) if existing else None))
        template = ds["spec"]["template"]
        current = naming.template_hash(template)
        strategy = ds["spec"]["updateStrategy"]
        surge = strategy.get("type", "RollingUpdate") == "RollingUpdate" and \
            strategy.get("rollingUpdate", {}).get("maxSurge", 0) >= 1
        on_delete = strategy.get("type") == "OnDelete"
        host_network = bool(template["spec"].get("hostNetwork"))
        mine = [p for p in objs.list("Pod", m.namespace)
                if p["metadata"]["ownerReferences"][0]["uid"] == ds["metadata"]["uid"]]
        node_objs = {o["metadata"]["name"]: o for o in objs.list("Node")}
        made: list[tuple[NodeInfo, str, str]] = []
        removed: list[dict[str, Any]] = []
        for node in nodes:
            here = [p for p in mine if p["spec"]["nodeName"] == node.name]
            if not objects.node_matches(node_objs.get(node.name), template["spec"].get("nodeSelector")):
                for p in here:
                    objs.delete("Pod", m.namespace, p["metadata"]["name"])
                    removed.append(p)
                continue
            fresh = [p for p in here if p["metadata"]["labels"].get("controller-revision-hash") == current]
            old = [p for p in here if p not in fresh]
            for extra in fresh[1:]:
                objs.delete("Pod", m.namespace, extra["metadata"]["name"])
                removed.append(extra)
            if old and on_delete:
                continue
            if old and not surge:
                for p in old:
                    objs.delete("Pod", m.namespace, p["metadata"]["name"])
                    removed.append(p)
                old = []
            if fresh:
                new_pod = fresh[0]
            else:
                name, ip = self._new_pod(objs, plan, node, m.namespace, m.name, host_network, made)
                new_pod = objs.put(objects.daemonset_pod(ds, name, node, ip))
            for p in old:
                if objects.pod_ready(new_pod):
                    objs.delete("Pod", m.namespace, p["metadata"]["name"])
                    removed.append(p)
                else:  # the kubelet deletes it once its replacement is Ready
                    marked = copy.deepcopy(p)
                    marked["metadata"].setdefault("annotations", {})[REPLACED_BY] = new_pod["metadata"]["name"]
                    objs.put(marked)
        return _verb(f"daemonset.apps/{m.name}", existing, ds), made, removed

    def _apply_deployment(self, objs: Objects, m: Manifest, nodes: list[NodeInfo], plan: AddressPlan,
                          keep_old: bool = False,
                          ) -> tuple[str, list[tuple[NodeInfo, str, str]], list[dict[str, Any]]]:
        existing = objs.get("Deployment", m.namespace, m.name)
        dep = objs.put(objects.deployment_object(m.body, copy.deepcopy(existing) if existing else None))
        thash = objects.pod_template_hash(dep)
        rs = objects.replicaset_object(dep, thash)
        removed: list[dict[str, Any]] = []
        for old_rs in objs.list("ReplicaSet", m.namespace):
            if old_rs["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"] and \
                    old_rs["metadata"]["name"] != rs["metadata"]["name"] and not keep_old:
                removed += self._delete_owned_pods(objs, old_rs)
                objs.delete("ReplicaSet", m.namespace, old_rs["metadata"]["name"])
        old = objs.get("ReplicaSet", m.namespace, rs["metadata"]["name"])
        if old is not None:
            rs["status"] = old["status"]
        rs = objs.put(rs)
        mine = [p for p in objs.list("Pod", m.namespace)
                if p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]]
        want = dep["spec"]["replicas"]
        made: list[tuple[NodeInfo, str, str]] = []
        for extra in sorted(mine, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)[:max(0, len(mine) - want)]:
            objs.delete("Pod", m.namespace, extra["metadata"]["name"])
            removed.append(extra)
        pod_spec = rs["spec"]["template"]["spec"]
        forced = ((rs["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(
            objects.POD_IP_ANNOTATION)
        for _ in range(max(0, want - len(mine))):
            if forced:
                node = self._node_of_ip(nodes, plan, forced)
            else:
                node = self._schedule(objs, nodes, pod_spec.get("nodeSelector"))
            name, ip = self._new_pod(objs, plan, node, m.namespace, rs["metadata"]["name"],
                                     bool(pod_spec.get("hostNetwork")), made, forced)
            objs.put(objects.pod_object(rs, name, node, ip))
        return _verb(f"deployment.apps/{m.name}", existing, dep), made, removed

    @staticmethod
    def _schedule(objs: Objects, nodes: list[NodeInfo], node_selector: dict[str, str] | None = None) -> NodeInfo:
        node_objs = {o["metadata"]["name"]: o for o in objs.list("Node")}
        fit = [n for n in nodes if objects.node_matches(node_objs.get(n.name), node_selector)]
        if not fit:
            raise ManifestError(f"no node matches nodeSelector {node_selector}")
        counts = {n.name: 0 for n in fit}
        for p in objs.list("Pod"):
            if p["spec"]["nodeName"] in counts:
                counts[p["spec"]["nodeName"]] += 1
        return min(fit, key=lambda n: (counts[n.name], n.index))

    @staticmethod
    def _node_of_ip(nodes: list[NodeInfo], plan: AddressPlan, ip: str) -> NodeInfo:
        """The node whose pod CIDR holds `ip` (a pod template's forced IP)."""
        import ipaddress

        for node in nodes:
            if ipaddress.ip_address(ip) in plan.pod_cidr(node.index):
                return node
        raise ManifestError(f"pod IP {ip} is in no node's pod CIDR")

    @staticmethod
    def _pod_name(objs: Objects, namespace: str, rs_name: str) -> str:
        while True:
            name = f"{rs_name}-{naming.random_suffix()}"
            if objs.get("Pod", namespace, name) is None:
                return name

    @staticmethod
    def _delete_owned_pods(objs: Objects, rs: dict[str, Any]) -> list[dict[str, Any]]:
        gone = []
        for p in objs.list("Pod", rs["metadata"]["namespace"]):
            if p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]:
                objs.delete("Pod", p["metadata"]["namespace"], p["metadata"]["name"])
                gone.append(p)
        return gone

    def _cleanup_pods(self, pods: list[dict[str, Any]], nodes: list[NodeInfo]) -> None:
        """After the objects are gone: stop the pods' processes and unwire their netns."""
        by_name = {n.name: n for n in nodes}
        for p in pods:
            ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
            if p["spec"].get("hostNetwork"):
                # No netns of its own; the kubelet stops its processes with the pod's grace period.
                shutil.rmtree(self.state.pod_workdir(ns, name), ignore_errors=True)
                continue
            pns = naming.pod_netns(self.name, ns, name)
            inode = netlink.netns_inode(pns)
            if inode is not None:
                kill_all(pids_in_netns({inode}), grace=2.0)
            node = by_name.get(p["spec"]["nodeName"])
            if node is not None:
                netlink.detach_pod(self.name, node, ns, name)
            shutil.rmtree(Path("/etc/netns") / pns, ignore_errors=True)
            shutil.rmtree(self.state.pod_workdir(ns, name), ignore_errors=True)

    def delete(self, path: str | Path | None = None, text: str | None = None,
               ignore_not_found: bool = False) -> list[str]:
        """Delete every object a file names (and what they own). Raises SandboxError naming the
        objects that were not found, after deleting the others (like kubectl)."""
        manifests = load_text(text, "<text>") if text is not None else load_file(str(path))
        self._require_up()
        nodes = self.nodes()
        removed: list[dict[str, Any]] = []
        messages: list[str] = []
        missing: list[str] = []
        with self.state.objects_txn() as objs:
            for m in sorted(manifests, key=lambda m: m.kind == "Namespace"):
                label = KIND_LABELS[m.kind]
                if objs.get(m.kind, m.namespace, m.name) is None:
                    missing.append(f"{label}/{m.name}")
                    continue
                if m.kind == "Namespace":
                    for kind in ("Deployment", "DaemonSet", "ReplicaSet", "Service", "EndpointSlice", "ConfigMap",
                                 "ServiceAccount"):
                        for o in objs.list(kind, m.name):
                            objs.delete(kind, m.name, o["metadata"]["name"])
                    for p in objs.list("Pod", m.name):
                        objs.delete("Pod", m.name, p["metadata"]["name"])
                        removed.append(p)
                elif m.kind == "DaemonSet":
                    ds = objs.get("DaemonSet", m.namespace, m.name)
                    assert ds is not None
                    for p in objs.list("Pod", m.namespace):
                        if p["metadata"]["ownerReferences"][0]["uid"] == ds["metadata"]["uid"]:
                            objs.delete("Pod", m.namespace, p["metadata"]["name"])
                            removed.append(p)
                elif m.kind == "Deployment":
                    dep = objs.get("Deployment", m.namespace, m.name)
                    assert dep is not None
                    for rs in objs.list("ReplicaSet", m.namespace):
                        if rs["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]:
                            removed += self._delete_owned_pods(objs, rs)
                            objs.delete("ReplicaSet", m.namespace, rs["metadata"]["name"])
                objs.delete(m.kind, m.namespace, m.name)
                messages.append(f"{label} \"{m.name}\" deleted")
            objects.derive(objs)
        self._cleanup_pods(removed, nodes)
        if missing and not ignore_not_found:
            raise SandboxError(f"not found: {', '.join(missing)}")
        return messages

    # ------------------------------------------------------------------------- reading
    def _require_up(self) -> None:
        if not self.exists() or self.state.infra().get("phase") != "up":
            raise SandboxError(f"sandbox {self.name} is not up (run: nodemesh sandbox up --name {self.name})")

    def objects(self) -> clusterstate.ClusterObjects:
        return self.state.objects()

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        pods = self.objects().of_kind("Pod")
        if namespace is not None:
            pods = [p for p in pods if p["metadata"]["namespace"] == namespace]
        return sorted(pods, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        for p in self.pods(namespace):
            if p["metadata"]["name"] == name:
                return p
        raise SandboxError(f'pods "{name}" not found in namespace {namespace}')

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo.from_json(n) for n in self.state.infra().get("nodes", [])]

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes():
            if n.name == name:
                return n
        raise SandboxError(f'nodes "{name}" not found')

    def pod_netns(self, namespace: str, pod: str) -> str:
        """The pod's network namespace (its node's, for a hostNetwork pod)."""
        p = self.pod(namespace, pod)
        if p["spec"].get("hostNetwork"):
            return self.node(p["spec"]["nodeName"]).netns
        return naming.pod_netns(self.name, namespace, pod)

    def exec(self, namespace: str, pod: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv inside the pod's netns (its hosts file applies) and, like `kubectl exec`, its
        cgroup (sandbox/cgroups.py: eBPF capture attaches there). kwargs go to subprocess.run."""
        check = kwargs.pop("check", False)
        full = ["ip", "netns", "exec", self.pod_netns(namespace, pod), *argv]
        p = self.pod(namespace, pod)
        cgroup = cgroups.pod_cgroup(self.name, p["spec"].get("nodeName", ""), p["metadata"]["uid"])
        if cgroup.is_dir():
            full = cgroups.join_argv(cgroup, full)
        return subprocess.run(full, check=check, **kwargs)

    def node_exec(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        check = kwargs.pop("check", False)
        return subprocess.run(["ip", "netns", "exec", self.node(node).netns, *argv], check=check, **kwargs)

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        p = self.pod(namespace, pod)
        cname = container or p["spec"]["containers"][0]["name"]
        try:
            return self.state.pod_log(namespace, pod, cname).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, namespace: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every Deployment (in namespace) has all replicas Ready; returns the pods."""
        deadline = time.monotonic() + timeout
        while True:
            objs = self.objects()
            deps = [d for d in objs.of_kind("Deployment")
                    if namespace is None or d["metadata"]["namespace"] == namespace]
            pods = [p for p in objs.of_kind("Pod") if namespace is None or p["metadata"]["namespace"] == namespace]
            if all(d.get("status", {}).get("readyReplicas", 0) >= d["spec"]["replicas"] for d in deps) and \
                    all(objects.pod_ready(p) for p in pods):
                return pods
            if time.monotonic() > deadline:
                tails = []
                for p in pods:
                    if not objects.pod_ready(p):
                        ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
                        tail = self.logs(ns, name).strip().splitlines()[-3:]
                        tails.append(f"{ns}/{name}: {' | '.join(tail) or '(no output)'}")
                raise TimeoutError(f"sandbox {self.name}: pods not ready after {timeout}s: {'; '.join(tails)}")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        infra = self.state.infra()
        pods = self.pods() if self.exists() else []
        runtime = read_json(self.state.runtime_file, {})
        return {
            "name": self.name, "up": self.is_up(), "phase": infra.get("phase", "absent"),
            "index": infra.get("index"), "cni": infra.get("cni"),
            "nodes": infra.get("nodes", []), "host_link": infra.get("host_link"), "host_ip": infra.get("host_ip"),
            "kubelet_pid": self._kubelet_pid(), "state_dir": str(self.state.dir),
            "pods": len(pods), "pods_ready": sum(1 for p in pods if objects.pod_ready(p)),
            "node_processes": {k: {**v, "pid": runtime.get("pids", {}).get(f"node/{k}"),
                                   "restarts": runtime.get("restarts", {}).get(f"node/{k}", 0)}
                               for k, v in (infra.get("node_processes") or {}).items()},
        }

    # ------------------------------------------------------------------------- node processes
    def start_node_process(self, node: str, name: str, argv: list[str], env: dict[str, str] | None = None,
                           timeout: float = 10.0) -> int:
        """Run argv as a supervised hostNetwork process in the node's netns (restarted on exit,
        log at node_process_log(node, name)). Returns its pid once started."""
        self._require_up()
        if not naming.is_dns_label(name):
            raise SandboxError(f"invalid node process name {name!r}")
        self.node(node)
        with self.state.infra_txn() as infra:
            infra.setdefault("node_processes", {})[name] = {"node": node, "argv": list(argv), "env": dict(env or {})}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.node_process_pid(name)
            if pid is not None:
                return pid
            time.sleep(0.05)
        raise SandboxError(f"node process {name} did not start within {timeout}s")

    def node_process_pid(self, name: str) -> int | None:
        pid = read_json(self.state.runtime_file, {}).get("pids", {}).get(f"node/{name}")
        return pid if pid is not None and alive(pid) else None

    def node_process_log(self, node: str, name: str) -> Path:
        return self.state.node_process_log(node, name)

    def stop_node_process(self, node: str, name: str, timeout: float = 10.0) -> None:
        pid = self.node_process_pid(name)
        with self.state.infra_txn() as infra:
            infra.get("node_processes", {}).pop(name, None)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            kill_all([pid])

    def ensure_api_server(self, node: str | None = None, timeout: float = 30.0) -> str:
        """Run the sandbox's API server (sandbox/apiserver.py) if it does not run yet: a hostNetwork
        pod on `node` (default: the first node) behind Service default/kubernetes at the first
        address of the service range, port 443, as on a real cluster. Returns its URL."""
        from nodemesh.sandbox import apiserver  # aiohttp: only for whoever runs one

        node = node or self.nodes()[0].name
        cluster_ip = str(self.plan.service_cidr[1])
        self.apply(text=apiserver.manifest(self.state_dir, cluster_ip, node))
        self.wait_ready("kube-system", timeout=timeout)
        return f"http://{cluster_ip}:443"

    def restart_node(self, node: str, timeout: float = 10.0) -> None:
        """Restart a node as a reboot looks to what runs on it: every process of the node (its
        pods' containers, hostNetwork pods, node processes, anything else in its netns) is killed
        with SIGKILL at once, then the kubelet starts everything again, init containers first, with
        no back-off. Pods on the pod network get a fresh netns and a new IP (as the CNI's IPAM
        gives after a reboot); the node's netns, addresses, iptables rules and conntrack stay.
        Returns once everything was killed (the restarts follow within BOOT_DELAY_S)."""
        self._require_up()
        self.node(node)
        with self.state.infra_txn() as infra:
            boots = infra.setdefault("node_boots", {})
            boots[node] = count = boots.get(node, 0) + 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if read_json(self.state.runtime_file, {}).get("node_boots", {}).get(node, 0) >= count:
                return
            time.sleep(0.05)
        raise SandboxError(f"the kubelet did not restart {node} within {timeout}s")

    # ------------------------------------------------------------------------- helpers
    def _write_infra(self, infra: dict[str, Any]) -> None:
        with self.state.infra_txn() as current:
            current.clear()
            current.update(infra)

    @staticmethod
    def _iptables_restore(ns: str, text: str, backend: str) -> None:
        res = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}-restore", "--noflush"],
                             input=text.encode(), capture_output=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"iptables-restore in {ns} failed: {res.stderr.decode().strip()}")


def system_iptables_backend() -> str:
    """What `iptables` on this machine is (update-alternatives): nft or legacy."""
    path = shutil.which("iptables") or "/usr/sbin/iptables"
    return "legacy" if "legacy" in os.path.basename(os.path.realpath(path)) else "nft"


def _node_backends(iptables: str | dict[str, str] | None, nodes: int) -> dict[str, str]:
    default = iptables if isinstance(iptables, str) else system_iptables_backend()
    per_node = iptables if isinstance(iptables, dict) else {}
    out = {naming.node_name(k): per_node.get(naming.node_name(k), default) for k in range(1, nodes + 1)}
    unknown = set(per_node) - set(out)
    if unknown:
        raise SandboxError(f"--iptables names no node of this sandbox: {', '.join(sorted(unknown))}")
    for node, backend in out.items():
        if backend not in ("nft", "legacy"):
            raise SandboxError(f"iptables backend of {node} must be nft or legacy, not {backend!r}")
    return out


def _same_netns_any(pid: int, inodes: set[int]) -> bool:
    import os

    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino in inodes
    except OSError:
        return False


def _verb(label: str, existing: dict[str, Any] | None, stored: dict[str, Any]) -> str:
    if existing is None:
        return f"{label} created"
    if existing["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]:
        return f"{label} unchanged"
    return f"{label} configured"


def list_sandboxes(state_root: str | Path = DEFAULT_STATE_ROOT) -> list[str]:
    reg = read_json(Path(state_root) / "registry.json", {"clusters": {}})
    return sorted(reg["clusters"])

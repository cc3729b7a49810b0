"""Recorded objects have the Kubernetes API's shape; bad input fails cleanly with nothing created;
`delete -f` removes what `apply -f` made; the CLI's `get pods` speaks kubectl."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodemesh.sandbox import naming, netlink
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import WHOAMI_APP, running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def cluster() -> Iterator[Sandbox]:
    with running_sandbox(nodes=2, cni="routed", manifests=[WHOAMI_APP]) as sb:
        yield sb


def _by(sb: Sandbox, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return sb.objects().of_kind(kind)


def test_pod_replicaset_deployment_chain(cluster: Sandbox) -> None:
    dep = next(d for d in _by(cluster, "Deployment") if d["metadata"]["name"] == "web")
    rs = [r for r in _by(cluster, "ReplicaSet") if r["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]]
    assert len(rs) == 1
    rs0 = rs[0]
    ref = rs0["metadata"]["ownerReferences"][0]
    assert ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": dep["metadata"]["uid"],
                   "controller": True, "blockOwnerDeletion": True}
    thash = rs0["metadata"]["labels"]["pod-template-hash"]
    assert rs0["metadata"]["name"] == f"web-{thash}"
    pods = [p for p in cluster.pods("shop") if p["metadata"]["ownerReferences"][0]["uid"] == rs0["metadata"]["uid"]]
    assert len(pods) == 2
    for p in pods:
        meta = p["metadata"]
        assert re.fullmatch(rf"web-{thash}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", meta["name"])
        assert meta["labels"] == {"app": "web", "pod-template-hash": thash}
        assert meta["ownerReferences"][0]["kind"] == "ReplicaSet"
        assert meta["ownerReferences"][0]["name"] == rs0["metadata"]["name"]
        assert p["apiVersion"] == "v1" and p["kind"] == "Pod"
        assert p["spec"]["nodeName"] in {"node1", "node2"}
        assert p["status"]["phase"] == "Running"
        assert p["status"]["podIP"] and p["status"]["hostIP"] == cluster.node(p["spec"]["nodeName"]).ip
        assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0
        assert "running" in p["status"]["containerStatuses"][0]["state"]
    assert dep["status"]["readyReplicas"] == 2 and rs0["status"]["readyReplicas"] == 2


def test_service_endpointslice_node_namespace(cluster: Sandbox) -> None:
    svc = next(s for s in _by(cluster, "Service") if s["metadata"]["name"] == "web")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["clusterIPs"] == [svc["spec"]["clusterIP"]]
    eps = next(e for e in _by(cluster, "EndpointSlice") if e["metadata"]["labels"]["kubernetes.io/service-name"] == "web")
    assert eps["apiVersion"] == "discovery.k8s.io/v1" and eps["addressType"] == "IPv4"
    assert eps["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]
    assert eps["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
    web = {p["metadata"]["name"]: p for p in cluster.pods("shop") if p["metadata"]["labels"]["app"] == "web"}
    assert {e["targetRef"]["name"] for e in eps["endpoints"]} == set(web)
    for e in eps["endpoints"]:
        pod = web[e["targetRef"]["name"]]
        assert e["addresses"] == [pod["status"]["podIP"]] and e["conditions"]["ready"] is True
        assert e["targetRef"]["uid"] == pod["metadata"]["uid"] and e["nodeName"] == pod["spec"]["nodeName"]
    nodes = {n["metadata"]["name"]: n for n in _by(cluster, "Node")}
    assert set(nodes) == {"node1", "node2"}
    for info in cluster.nodes():
        n = nodes[info.name]
        assert n["spec"]["podCIDR"] == info.pod_cidr and n["spec"]["podCIDRs"] == [info.pod_cidr]
        assert {"type": "InternalIP", "address": info.ip} in n["status"]["addresses"]
    ns = next(n for n in _by(cluster, "Namespace") if n["metadata"]["name"] == "shop")
    assert ns["metadata"]["labels"] == {"team": "web", "kubernetes.io/metadata.name": "shop"}


def test_resource_versions_are_unique_and_grow(cluster: Sandbox) -> None:
    objs = cluster.objects()
    rvs = [int(o["metadata"]["resourceVersion"]) for o in objs.items]
    assert len(set(rvs)) == len(rvs) and max(rvs) <= objs.resource_version
    uids = [o["metadata"]["uid"] for o in objs.items]
    assert len(set(uids)) == len(uids)
    before = objs.resource_version
    cluster.apply(text=WHOAMI_APP)  # unchanged: nothing bumps
    assert cluster.objects().resource_version == before


def _cli(*args: str, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nodemesh", "sandbox", *args, "--name", name], capture_output=True, text=True,
                          timeout=60, check=False)


def test_get_pods_json_and_table(cluster: Sandbox) -> None:
    out = _cli("get", "pods", "-n", "shop", "-o", "json", name=cluster.name)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    assert {p["metadata"]["name"] for p in doc["items"]} == {p["metadata"]["name"] for p in cluster.pods("shop")}
    wide = _cli("get", "pods", "-A", "-o", "wide", name=cluster.name)
    lines = wide.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    web = next(ln.split() for ln in lines if " web-" in ln)
    pod = cluster.pod("shop", web[1])
    assert web[2:5] == ["1/1", "Running", "0"] and web[6] == pod["status"]["podIP"] and web[7] == pod["spec"]["nodeName"]
    logs = _cli("logs", "-n", "shop", web[1], name=cluster.name)
    assert logs.returncode == 0
    # `--name` after `--` would be part of the command: pass it via the environment instead
    ex = subprocess.run(["nodemesh", "sandbox", "exec", "-n", "shop", web[1], "--", "cat", "/etc/hosts"],
                        env={**os.environ, "NODEMESH_SANDBOX": cluster.name}, capture_output=True, text=True,
                        timeout=30, check=False)
    assert ex.returncode == 0 and "web.shop.svc.cluster.local" in ex.stdout


BAD = {
    "unknown kind": ("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: x}\n", "unknown kind"),
    "no command": (("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n"
                   "  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: nginx}]\n"),
                   "no command"),
    "port clash": (("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  selector: {a: b}\n"
                   "  ports: [{name: a, port: 80}, {name: b, port: 80}]\n"), "port clash"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nonzero_nothing_created(cluster: Sandbox, case: str, tmp_path: Path) -> None:
    text, needle = BAD[case]
    # a good document first: validation of the whole file comes before creating anything
    good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shouldnotexist}\n---\n"
    f = tmp_path / "bad.yaml"
    f.write_text(good + text)
    rv = cluster.objects().resource_version
    netns_before = netlink.list_cluster_netns(cluster.name)
    out = _cli("apply", "-f", str(f), name=cluster.name)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr, out.stderr
    assert out.stdout == ""
    assert cluster.objects().resource_version == rv
    assert netlink.list_cluster_netns(cluster.name) == netns_before


def test_missing_file(cluster: Sandbox) -> None:
    out = _cli("apply", "-f", "/nonexistent/app.yaml", name=cluster.name)
    assert out.returncode == 1 and out.stderr.strip() == 'error: the path "/nonexistent/app.yaml" does not exist'


def test_delete_removes_pods_netns_and_rules(cluster: Sandbox, tmp_path: Path) -> None:
    extra = WHOAMI_APP.replace("name: shop", "name: extra").replace("namespace: shop", "namespace: extra")
    f = tmp_path / "extra.yaml"
    f.write_text(extra)
    out = _cli("apply", "-f", str(f), name=cluster.name)
    assert out.returncode == 0 and "deployment.apps/web created" in out.stdout
    cluster.wait_ready("extra", timeout=30)
    pods = cluster.pods("extra")
    assert len(pods) == 3
    pns = {naming.pod_netns(cluster.name, "extra", p["metadata"]["name"]) for p in pods}
    assert pns <= set(netlink.list_cluster_netns(cluster.name))
    svc_ip = next(s for s in _by(cluster, "Service") if s["metadata"]["namespace"] == "extra")["spec"]["clusterIP"]
    out = _cli("delete", "-f", str(f), name=cluster.name)
    assert out.returncode == 0, out.stderr
    assert cluster.pods("extra") == []
    assert not pns & set(netlink.list_cluster_netns(cluster.name))
    assert not [o for o in cluster.objects().items if o["metadata"].get("namespace") == "extra"
                or o["metadata"]["name"] == "extra"]
    assert not [d for d in os.listdir("/etc/netns") if d in pns]
    nat = cluster.node_exec("node1", ["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert svc_ip not in nat and "extra/web" not in nat
    assert "shop/web" in nat  # the other namespace's service is untouched
    again = _cli("delete", "-f", str(f), name=cluster.name)
    assert again.returncode == 1 and "not found" in again.stderr

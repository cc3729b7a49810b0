"""kube-proxy rule rendering, EndpointSlice derivation, hosts files: pure functions."""

from __future__ import annotations

import re
from typing import Any

from nodemesh.api.clusterstate import ClusterObjects
from nodemesh.sandbox import kubeproxy, objects
from nodemesh.sandbox.kubelet import Backoff
from nodemesh.sandbox.netlink import NodeInfo
from nodemesh.sandbox.state import Objects


def _svc(name: str, ip: str, target: Any = 8080, ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": {"clusterIP": ip, "selector": {"app": name},
                     "ports": [{"name": "", "port": 80, "targetPort": target, "protocol": "TCP"}]}}


def _slice(name: str, eps: list[tuple[str, bool]], ns: str = "shop") -> dict[str, Any]:
    return {"kind": "EndpointSlice", "metadata": {"name": f"{name}-x", "namespace": ns,
                                                  "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": r}} for ip, r in eps]}


def test_spreads_over_ready_endpoints_only() -> None:
    ports = kubeproxy.service_ports(
        [_svc("web", "10.96.0.10")],
        [_slice("web", [("10.244.1.2", True), ("10.244.2.2", True), ("10.244.2.3", True), ("10.244.1.9", False)])])
    text = kubeproxy.render(ports)
    svc_chain = ports[0].svc_chain
    assert "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp" in text and f"--dport 80 -j {svc_chain}" in text
    probs = re.findall(rf"-A {svc_chain} .*?--probability (\S+)", text)
    assert [round(float(p), 4) for p in probs] == [0.3333, 0.5]
    assert len(re.findall(rf"-A {svc_chain} ", text)) == 3  # the last has no statistic match
    assert "10.244.1.9" not in text
    assert text.count("-j DNAT --to-destination") == 3
    assert "-j KUBE-MARK-MASQ" in text  # hairpin
    assert text.startswith("*nat\n") and text.rstrip().endswith("COMMIT")


def test_no_ready_endpoint_rejects_in_filter() -> None:
    ports = kubeproxy.service_ports([_svc("web", "10.96.0.10")], [_slice("web", [("10.244.1.2", False)])])
    text = kubeproxy.render(ports)
    nat, filt = text.split("*filter")
    assert "10.96.0.10" not in nat
    assert "-d 10.96.0.10/32 -p tcp" in filt and "-j REJECT" in filt


def test_stale_chains_are_deleted_and_ours_kept() -> None:
    before = kubeproxy.render(kubeproxy.service_ports([_svc("web", "10.96.0.10")],
                                                      [_slice("web", [("10.244.1.2", True)])]))
    stale = kubeproxy.chains_of(before)
    assert len(stale) == 2
    after = kubeproxy.render([], stale)
    for chain in stale:
        assert f"-X {chain}" in after


def test_base_jumps_append_to_builtin_chains() -> None:
    text = kubeproxy.base_jumps()
    assert "-A PREROUTING" in text and "-A OUTPUT" in text and "-I " not in text


def test_hosts_file_short_name_only_in_own_namespace() -> None:
    text = kubeproxy.render_hosts("shop", "client-1", "10.244.1.3",
                                  [_svc("web", "10.96.0.10"), _svc("db", "10.96.0.11", ns="data")])
    lines = text.splitlines()
    assert "10.244.1.3\tclient-1" in lines
    assert "10.96.0.10\tweb.shop.svc.cluster.local web.shop.svc web.shop web" in lines
    assert "10.96.0.11\tdb.data.svc.cluster.local db.data.svc db.data" in lines


def _objs_with_pods(ready: list[bool]) -> Objects:
    objs = Objects(ClusterObjects())
    node = NodeInfo("node1", 1, "nm-t-node1", "10.240.1.1", "10.101.1.0/24", "bridge", "cni0")
    dep = objs.put(objects.deployment_object({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"replicas": len(ready), "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "command": ["x"],
                                                       "ports": [{"containerPort": 8080, "name": "http"}]}]}}}},
        None))
    rs = objs.put(objects.replicaset_object(dep, objects.pod_template_hash(dep)))
    for i, r in enumerate(ready):
        pod = objects.pod_object(rs, f"{rs['metadata']['name']}-p{i}", node, f"10.101.1.{i + 2}")
        pod["status"]["conditions"].append({"type": "Ready", "status": "True" if r else "False"})
        objs.put(pod)
    objs.put(objects.service_object(_svc("web", "10.97.1.10", target="http"), "10.97.1.10"))
    return objs


def test_derive_endpointslice_and_statuses() -> None:
    objs = _objs_with_pods([True, False])
    objects.derive(objs)
    (eps,) = objs.list("EndpointSlice")
    assert eps["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]  # named targetPort resolved
    assert [e["conditions"]["ready"] for e in eps["endpoints"]] == [True, False]
    assert eps["endpoints"][0]["targetRef"]["kind"] == "Pod"
    (dep,) = objs.list("Deployment")
    assert dep["status"]["replicas"] == 2 and dep["status"]["readyReplicas"] == 1
    rv = objs.data.resource_version
    objects.derive(objs)  # nothing changed: no resourceVersion bump
    assert objs.data.resource_version == rv


def test_objects_put_and_delete_bump_resource_version() -> None:
    objs = Objects(ClusterObjects())
    ns = objs.put(objects.namespace_object("a"))
    assert ns["metadata"]["resourceVersion"] == "1" and ns["metadata"]["uid"]
    objs.put(objects.namespace_object("a"))
    assert objs.data.resource_version == 1
    changed = objs.put(objects.namespace_object("a", {"x": "y"}))
    assert changed["metadata"]["resourceVersion"] == "2" and changed["metadata"]["uid"] == ns["metadata"]["uid"]
    objs.delete("Namespace", "", "a")
    assert objs.data.resource_version == 3 and objs.list("Namespace") == []


def test_kubelet_backoff_doubles_and_caps() -> None:
    b = Backoff(10.0, 300.0)
    assert [b.delay(n) for n in range(7)] == [10, 20, 40, 80, 160, 300, 300]

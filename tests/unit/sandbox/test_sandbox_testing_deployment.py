"""sandbox/testing.py's Deployment and Service builders: the integration tests' apps are written with them."""

from __future__ import annotations

import yaml
from nodemesh.sandbox.manifests import load_text
from nodemesh.sandbox.testing import deployment

SCRIPT = 'import sys\nprint("a: b", {"k": [1]}) # \'quotes\' --- and a colon: here\n'


def _doc(text: str) -> dict:  # type: ignore[type-arg]
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    return doc


def test_deployment_the_sandbox_accepts_with_every_option() -> None:
    text = deployment("web", "shop", ["python3", "-c", SCRIPT], ports=[("main", 8080), 9090], replicas=3,
                      labels={"tier": "front"}, pod_name_env=True, env={"VERSION": "2"}, node="node2",
                      service_account="web", readiness_tcp=True, pod_annotations={"nodemesh.io/x": "y"})
    (m,) = load_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---" + text, "t")[1:]
    assert (m.kind, m.name, m.namespace) == ("Deployment", "web", "shop")
    doc = _doc(text)
    assert doc["spec"]["replicas"] == 3
    assert doc["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    template = doc["spec"]["template"]
    assert template["metadata"] == {"labels": {"app": "web", "tier": "front"},
                                    "annotations": {"nodemesh.io/x": "y"}}
    pod = template["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "node2"} and pod["serviceAccountName"] == "web"
    (c,) = pod["containers"]
    assert c["command"] == ["python3", "-c", SCRIPT]  # a script's quotes, colons and newlines survive
    assert c["ports"] == [{"containerPort": 8080, "name": "main"}, {"containerPort": 9090}]
    assert c["env"] == [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "VERSION", "value": "2"}]
    assert c["readinessProbe"] == {"tcpSocket": {"port": "main"}, "periodSeconds": 1}


def test_deployment_defaults_are_bare_and_documents_join_with_separators() -> None:
    a = deployment("client", "ns", ["sleep", "infinity"])
    pod = _doc(a)["spec"]["template"]["spec"]
    assert pod == {"containers": [{"name": "client", "command": ["sleep", "infinity"]}]}
    both = "---".join([deployment("a", "ns", ["x"]), deployment("b", "ns", ["y"], selector={"pod": "b"},
                                                                 labels={"app": "shared"}, host_network=True)])
    docs = [d for d in yaml.safe_load_all(both) if d]
    assert [d["metadata"]["name"] for d in docs] == ["a", "b"]
    assert docs[1]["spec"]["selector"] == {"matchLabels": {"pod": "b"}}
    assert docs[1]["spec"]["template"]["metadata"]["labels"] == {"pod": "b", "app": "shared"}
    assert docs[1]["spec"]["template"]["spec"]["hostNetwork"] is True


def test_service_in_front_of_a_deployment() -> None:
    from nodemesh.sandbox.testing import service

    text = service("web", "shop", [("http", 80, "main"), ("p81", 81, 8081)], cluster_ip="10.96.0.9",
                   annotations={"nodemesh.io/routes": '[{"name": "x"}]'})
    (m,) = load_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---" + text, "t")[1:]
    assert (m.kind, m.name) == ("Service", "web")
    doc = _doc(text)
    assert doc["metadata"]["annotations"] == {"nodemesh.io/routes": '[{"name": "x"}]'}
    assert doc["spec"] == {"clusterIP": "10.96.0.9", "selector": {"app": "web"},
                           "ports": [{"name": "http", "port": 80, "targetPort": "main"},
                                     {"name": "p81", "port": 81, "targetPort": 8081}]}
    # One port needs no name; the selector can be other labels.
    assert _doc(service("db", "shop", [(5432, 5432)], selector={"pod": "db-0"}))["spec"] == {
        "selector": {"pod": "db-0"}, "ports": [{"port": 5432, "targetPort": 5432}]}

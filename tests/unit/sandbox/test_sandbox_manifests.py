"""Manifest parsing and validation: every document checked before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest
from nodemesh.sandbox.manifests import ManifestError, load_file, load_text
from nodemesh.sandbox.testing import WHOAMI_APP

DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        command: [python3, -m, http.server]
        ports: [{containerPort: 8000, name: http}]
        readinessProbe: {tcpSocket: {port: http}}
"""


def test_whoami_app_parses_in_order() -> None:
    docs = load_text(WHOAMI_APP)
    assert [(m.kind, m.namespace, m.name) for m in docs] == [
        ("Namespace", "", "shop"), ("Deployment", "shop", "web"), ("Service", "shop", "web"),
        ("Deployment", "shop", "client"),
    ]
    svc = docs[2].body
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["protocol"] == "TCP"


def test_defaults_namespace_and_replicas() -> None:
    (m,) = load_text(DEPLOY.replace("  replicas: 2\n", ""))
    assert m.namespace == "default" and m.body["spec"]["replicas"] == 1


def test_list_kind_is_unwrapped() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
    assert [m.name for m in load_text(text)] == ["a"]


@pytest.mark.parametrize(("text", "needle"), [
    ("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: x}\n", "unknown kind 'PersistentVolumeClaim'"),
    ("apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n", "unknown kind 'Deployment' (apiVersion v1)"),
    (DEPLOY.replace("        command: [python3, -m, http.server]\n", ""), "has no command"),
    (DEPLOY.replace("ports: [{containerPort: 8000, name: http}]",
                    "ports: [{containerPort: 8000}, {containerPort: 8000}]"), "port clash"),
    (DEPLOY.replace("matchLabels: {app: web}", "matchLabels: {app: other}"), "selector does not match"),
    (DEPLOY.replace("port: http}", "port: metrics}"), "readinessProbe port 'metrics'"),
    (DEPLOY.replace("metadata: {name: web}", "metadata: {name: Web_1}"), "DNS label"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 80}]}\n",
     "port clash"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: NodePort, ports: [{port: 80}]}\n",
     "only type ClusterIP"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: UDP}]}\n",
     "only TCP"),
    ("kind: [\n", "invalid YAML"),
    # Malformed shapes are one line too, never a traceback (and never a Service that makes the
    # kubelet's iptables-restore fail for every Service of the node).
    ("apiVersion: v1\nkind: Namespace\nmetadata: [1]\n", "metadata must be a mapping"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, annotations: [x]}\n", "annotations"),
    ("apiVersion: v1\nkind: List\nitems: 3\n", "items must be a list"),
    (DEPLOY.replace("matchLabels: {app: web}", "matchLabels: [app]"), "matchLabels"),
    (DEPLOY.replace("metadata: {labels: {app: web}}", "metadata: [1]"), "template.metadata"),
    (DEPLOY.replace("metadata: {labels: {app: web}}", "metadata: {labels: {app: web}, annotations: [x]}"),
     "annotations"),
    (DEPLOY.replace("command: [python3, -m, http.server]", "command: python3 -m http.server"),
     "command and args must be lists"),
    (DEPLOY.replace("replicas: 2", "replicas: true"), "spec.replicas"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: 1.5}]}\n",
     "invalid targetPort"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: 0}]}\n",
     "invalid targetPort"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, name: 1}, {port: 81, name: 2}]}\n",
     "port name"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: [1], ports: [{port: 80}]}\n",
     "clusterIP"),
    (("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\n"
     "metadata: {name: a}\n"), "appears twice"),
])
def test_bad_documents_are_one_line_errors(text: str, needle: str) -> None:
    with pytest.raises(ManifestError) as err:
        load_text(text, source="app.yaml")
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("app.yaml")


def test_invalid_yaml_names_the_line_and_the_problem() -> None:
    with pytest.raises(ManifestError) as err:
        load_text("apiVersion: v1\nkind: [Namespace,\n", source="app.yaml")
    assert str(err.value).startswith("app.yaml: invalid YAML: line 3")
    assert "expected" in str(err.value) and "\n" not in str(err.value)


def test_second_bad_document_rejects_the_whole_file() -> None:
    with pytest.raises(ManifestError, match="document 2"):
        load_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\n"
                  "metadata: {name: s}\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match='the path ".*nope.yaml" does not exist'):
        load_file(tmp_path / "nope.yaml")

"""The sandbox runs system components the way Kubernetes does (issue 11's sandbox).

A DaemonSet of hostNetwork pods with an init container, volumes, a projected token and an exec
probe, rolled with maxSurge; the API server pod behind `default/kubernetes` used by the real
`kubernetes` client (list, watch, get, TokenReview); a node restart (processes killed, pods
renumbered, rules kept); a node whose iptables backend is legacy.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from nodemesh.sandbox import tokens
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import FETCH, WHOAMI_APP, running_sandbox

pytestmark = pytest.mark.root
PY = sys.executable

DAEMONSET = """
apiVersion: v1
kind: Namespace
metadata: {name: sys}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: sys}
data: {greeting: hello}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: nodeagent, namespace: sys}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: nodeagent, namespace: sys}
spec:
  selector: {matchLabels: {app: nodeagent}}
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: nodeagent}, annotations: {version: "__V__"}}
    spec:
      hostNetwork: true
      serviceAccountName: nodeagent
      terminationGracePeriodSeconds: 5
      initContainers:
      - name: init
        command: [/bin/sh, -c, 'echo "$(NODE_NAME)" > /run/x/node']
        env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]
        volumeMounts: [{name: run, mountPath: /run/x}]
      containers:
      - name: main
        command: [/bin/sh, -c, 'echo "$(cat /run/x/node) $(cat /etc/cfg/greeting) $(cat /var/tok/token)" > /run/x/seen; touch /run/x/ready; exec sleep infinity']
        readinessProbe:
          exec: {command: [/bin/sh, -c, 'test -f /run/x/ready']}
          periodSeconds: 1
        volumeMounts:
        - {name: run, mountPath: /run/x}
        - {name: cfg, mountPath: /etc/cfg}
        - {name: tok, mountPath: /var/tok}
      volumes:
      - {name: run, emptyDir: {}}
      - {name: cfg, configMap: {name: cfg}}
      - name: tok
        projected: {sources: [{serviceAccountToken: {audience: aud1, path: token}}]}
"""

CLIENT = r"""
import json, sys
from kubernetes import client, config, watch
config.load_kube_config()
v1 = client.CoreV1Api()
out = {"pods": sorted(p.metadata.name for p in v1.list_pod_for_all_namespaces().items),
       "node2_cidr": v1.read_node("node2").spec.pod_cidr}
review = client.AuthenticationV1Api().create_token_review(client.V1TokenReview(
    spec=client.V1TokenReviewSpec(token=sys.argv[1], audiences=["aud1"])))
out["review"] = [review.status.authenticated, review.status.user.username if review.status.user else None]
rv = v1.list_namespace().metadata.resource_version
print("watching", flush=True)  # the test adds the namespace only now: a later one is what it watches for
for event in watch.Watch().stream(v1.list_namespace, resource_version=rv, timeout_seconds=20):
    if event["object"].metadata.name == "late":
        out["watched"] = event["type"]
        break
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    with running_sandbox(nodes=2, manifests=[WHOAMI_APP, DAEMONSET.replace("__V__", "1")], backoff=(1.0, 10.0),
                         iptables={"node2": "legacy"}) as cluster:
        yield cluster


def _ds_pods(sb: Sandbox) -> dict[str, dict]:
    return {p["spec"]["nodeName"]: p for p in sb.pods("sys")}


def test_sandbox_daemonset_host_network_init_volumes_token(sb: Sandbox) -> None:
    pods = _ds_pods(sb)
    assert set(pods) == {"node1", "node2"}
    for node, pod in pods.items():
        assert pod["status"]["podIP"] == sb.node(node).ip  # hostNetwork: the node's address
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        seen = (sb.state_dir / "pods" / f"sys_{pod['metadata']['name']}" / "volumes" / "run" / "seen").read_text()
        name, greeting, token = seen.split()
        assert (name, greeting) == (node, "hello")
        review = tokens.TokenBook(sb.state_dir).review(token, ["aud1"])
        assert review.authenticated and review.username == "system:serviceaccount:sys:nodeagent"
        assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    ds = next(o for o in sb.objects().of_kind("DaemonSet"))
    assert ds["status"]["numberReady"] == 2 and ds["status"]["desiredNumberScheduled"] == 2


def test_sandbox_daemonset_rolls_with_surge(sb: Sandbox) -> None:
    old = {n: p["metadata"]["name"] for n, p in _ds_pods(sb).items()}
    sb.apply(text=DAEMONSET.replace("__V__", "2"))
    both = {p["metadata"]["name"] for p in sb.pods("sys")}
    assert set(old.values()) < both and len(both) == 4  # the new pods start beside the old ones

    def rolled() -> bool:
        names = {p["metadata"]["name"] for p in sb.pods("sys")}
        return len(names) == 2 and not names & set(old.values())

    deadline = time.monotonic() + 30
    while not rolled() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rolled()
    assert all(p["metadata"]["annotations"]["version"] == "2" for p in sb.pods("sys"))


def test_sandbox_api_server_serves_the_kubernetes_client(sb: Sandbox) -> None:
    url = sb.ensure_api_server()
    assert url == f"http://{sb.plan.service_cidr[1]}:443"
    token = tokens.mint(sb.state_dir, "sys", "nodeagent", ["aud1"])
    client = next(p["metadata"]["name"] for p in sb.pods("shop") if p["metadata"]["name"].startswith("client-"))
    # The kubeconfig the kubelet gave the pod (server: the Service), used as the pod's containers do.
    kubeconfig = sb.state_dir / "pods" / f"shop_{client}" / "serviceaccount" / "kubeconfig"
    deadline = time.monotonic() + 10
    while not kubeconfig.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc = subprocess.Popen(["ip", "netns", "exec", sb.pod_netns("shop", client), PY, "-c", CLIENT, token],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)   # imports and three calls first: slow when busy
    first = proc.stdout.readline() if ready else ""
    assert first.strip() == "watching", (first, proc.poll())
    sb.apply(text="apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n")
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert any(p.startswith("kube-apiserver-") for p in result["pods"]) and result["node2_cidr"]
    assert result["review"] == [True, "system:serviceaccount:sys:nodeagent"]
    assert result["watched"] == "ADDED"


def test_sandbox_node_restart_kills_renumbers_and_keeps_rules(sb: Sandbox) -> None:
    before = {p["metadata"]["name"]: p["status"]["podIP"] for p in sb.pods("shop") if p["spec"]["nodeName"] == "node1"}
    sb.node_exec("node1", ["iptables-nft", "-t", "nat", "-N", "TESTKEPT"], check=True)
    ds_pod = _ds_pods(sb)["node1"]
    sb.restart_node("node1")
    sb.wait_ready(timeout=30)
    after = {p["metadata"]["name"]: p["status"]["podIP"] for p in sb.pods("shop") if p["spec"]["nodeName"] == "node1"}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert "TESTKEPT" in sb.node_exec("node1", ["iptables-nft-save", "-t", "nat"], capture_output=True,
                                      text=True).stdout
    restarted = _ds_pods(sb)["node1"]
    assert restarted["metadata"]["name"] == ds_pod["metadata"]["name"]
    assert restarted["status"]["containerStatuses"][0]["restartCount"] == 1
    client = next(p["metadata"]["name"] for p in sb.pods("shop") if p["metadata"]["name"].startswith("client-"))
    res = sb.exec("shop", client, [PY, "-c", FETCH, "http://web/"], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0 and res.stdout.strip().startswith("web-")  # Services follow the new IPs


def test_sandbox_node_iptables_backend_per_node(sb: Sandbox) -> None:
    assert (sb.node("node1").iptables, sb.node("node2").iptables) == ("nft", "legacy")
    for node, backend, other in (("node1", "nft", "legacy"), ("node2", "legacy", "nft")):
        mine = sb.node_exec(node, [f"iptables-{backend}-save", "-t", "nat"], capture_output=True, text=True).stdout
        theirs = sb.node_exec(node, [f"iptables-{other}-save", "-t", "nat"], capture_output=True, text=True).stdout
        assert "KUBE-SERVICES" in mine and "KUBE-SERVICES" not in theirs, node

"""The Kubernetes manifest configures authentication end to end: the controller runs TokenReview
for the audience the agents' projected token carries, the agents present that token, and the
controller's RBAC may create TokenReviews."""

from __future__ import annotations

from typing import Any

import yaml
from nodemesh.controlplane.auth import AccessPolicy
from nodemesh.controlplane.main import parse_args
from nodemesh.manifests.render import render_daemonset


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_daemonset()) if d]


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def test_controlplane_auth_manifest_agents_present_what_the_controller_checks() -> None:
    docs = _docs()
    controller = _kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = parse_args(controller["args"])
    assert config.token_review and not config.token_file and not config.insecure_open_api
    assert any(e["name"] == "POD_NAMESPACE" for e in controller["env"])  # the policy's namespace

    agent_pod = _kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    agent = next(c for c in agent_pod["containers"] if c["name"] == "agent")
    token_path = agent["args"][agent["args"].index("--token-file") + 1]
    mount = next(m for m in agent["volumeMounts"] if token_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in agent_pod["volumes"] if v["name"] == mount["name"])
    (source,) = volume["projected"]["sources"]
    sa_token = source["serviceAccountToken"]
    assert token_path == f"{mount['mountPath']}/{sa_token['path']}"
    assert sa_token["audience"] in config.token_audiences

    # The ServiceAccount the agents run as is the one the default policy lets Connect.
    namespace = _kind(docs, "DaemonSet")["metadata"]["namespace"]
    policy = AccessPolicy.for_namespace(namespace)
    assert policy.agents == {f"system:serviceaccount:{namespace}:{agent_pod['serviceAccountName']}"}
    cli_sa = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    assert any(policy.readers == {f"system:serviceaccount:{namespace}:{name}"} for name in cli_sa)


def test_controlplane_auth_manifest_controller_may_create_tokenreviews() -> None:
    docs = _docs()
    sa = _kind(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [d for d in docs if d["kind"] == "ClusterRoleBinding"
                and any(s["name"] == sa for s in d["subjects"])]
    roles = [d for d in docs if d["kind"] == "ClusterRole"
             and d["metadata"]["name"] in {b["roleRef"]["name"] for b in bindings}]
    rules = [r for role in roles for r in role["rules"]]
    assert any("authentication.k8s.io" in r["apiGroups"] and "tokenreviews" in r["resources"]
               and "create" in r["verbs"] for r in rules)

"""demo/emojivoto.yml: the objects the demo and a real cluster need, and commands that really exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import nodemesh.demo
import pytest
import yaml

MANIFEST = Path(nodemesh.demo.__file__).resolve().parent / "emojivoto.yml"
IMAGE = "ghcr.io/nodemesh/nodemesh:0.1.0"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    found = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(found) == len(docs), "no object twice"
    return found


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_has_exactly_the_app_objects(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(objects) == {
        ("Namespace", "emojivoto"),
        ("Deployment", "web"), ("Deployment", "emoji"), ("Deployment", "voting"), ("Deployment", "vote-bot"),
        ("Service", "web-svc"), ("Service", "emoji-svc"), ("Service", "voting-svc"),
    }
    for (kind, _), obj in objects.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "emojivoto"


@pytest.mark.parametrize("name,module,app", [
    ("web", "nodemesh.demo.emojivoto.web", "web-svc"),
    ("emoji", "nodemesh.demo.emojivoto.emoji", "emoji-svc"),
    ("voting", "nodemesh.demo.emojivoto.voting", "voting-svc"),
    ("vote-bot", "nodemesh.demo.emojivoto.votebot", "vote-bot"),
])
def test_deployments_run_our_modules_with_upstream_labels(
        objects: dict[tuple[str, str], dict[str, Any]], name: str, module: str, app: str) -> None:
    deploy = objects[("Deployment", name)]
    labels = {"app": app, "version": "v11"}
    assert deploy["spec"]["selector"]["matchLabels"] == labels
    assert deploy["spec"]["template"]["metadata"]["labels"] == labels
    assert deploy["metadata"]["labels"]["app.kubernetes.io/part-of"] == "emojivoto"
    container = _container(deploy)
    assert container["image"] == IMAGE
    assert container["command"] == ["python3", "-m", module]
    assert importlib.util.find_spec(module) is not None
    assert container["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("service,deploy,port,target,probe", [
    ("web-svc", "web", 80, 8080, "httpGet"),
    ("emoji-svc", "emoji", 8080, 8080, "tcpSocket"),
    ("voting-svc", "voting", 8080, 8080, "tcpSocket"),
])
def test_services_reach_the_container_port(objects: dict[tuple[str, str], dict[str, Any]], service: str,
                                           deploy: str, port: int, target: int, probe: str) -> None:
    svc = objects[("Service", service)]
    pod_labels = objects[("Deployment", deploy)]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, target)]
    container = _container(objects[("Deployment", deploy)])
    assert [p["containerPort"] for p in container["ports"]] == [target]
    handler = container["readinessProbe"][probe]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get(handler["port"], handler["port"]) == target


def test_env_wires_the_call_graph(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert _env(_container(objects[("Deployment", "web")])) == {
        "WEB_PORT": "8080", "EMOJISVC_HOST": "emoji-svc.emojivoto:8080",
        "VOTINGSVC_HOST": "voting-svc.emojivoto:8080"}
    assert _env(_container(objects[("Deployment", "emoji")]))["GRPC_PORT"] == "8080"
    voting_env = _env(_container(objects[("Deployment", "voting")]))
    assert (voting_env["GRPC_PORT"], voting_env["FAILURE_RATE"]) == ("8080", "1.0")
    bot_env = _env(_container(objects[("Deployment", "vote-bot")]))
    assert bot_env["WEB_HOST"] == "web-svc.emojivoto:80"
    assert bot_env["VOTEBOT_STATS_FILE"]


def test_env_values_parse_with_the_programs_own_config(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    from nodemesh.demo.emojivoto import runtime, votebot, voting, web

    web.WebConfig.from_env(_env(_container(objects[("Deployment", "web")])))
    runtime.GrpcServerConfig.from_env(_env(_container(objects[("Deployment", "emoji")])))
    voting.VotingConfig.from_env(_env(_container(objects[("Deployment", "voting")])))
    votebot.VoteBotConfig.from_env(_env(_container(objects[("Deployment", "vote-bot")])))

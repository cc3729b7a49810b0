"""The commands in daemonset.yaml run: their flags parse with the real agent, redirector and
controller parsers, the `sh -c` wrapper hands over the pod CIDRs intact, and the init container
reads node.spec.podCIDRs from a real (local) HTTP API server through the kubernetes client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from nodemesh.agent.__main__ import build_config as agent_config
from nodemesh.agent.__main__ import parser as agent_parser
from nodemesh.controlplane.main import parse_args as controller_args
from nodemesh.controlplane.servingtls import service_hosts
from nodemesh.manifests import render as manifest
from nodemesh.manifests.render import InstallValues, apply_sets, render_daemonset
from nodemesh.redirector.cli import _capture_config, _parser

NODE_ENV = {"NODE_NAME": "node-a", "NODE_IP": "192.0.2.10"}


def _pod_spec(kind: str, values: InstallValues | None = None) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(render_daemonset(values)) if d]
    return next(d for d in docs if d["kind"] == kind)["spec"]["template"]["spec"]


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _kubelet_expand(args: list[str]) -> list[str]:
    # What the kubelet does with $(VAR) in args, for the downward-API variables the pod defines.
    out = []
    for arg in args:
        for name, value in NODE_ENV.items():
            arg = arg.replace(f"$({name})", value)
        out.append(arg)
    return out


def _run_wrapper(container: dict[str, Any], cidrs_file: Path) -> list[str]:
    """Run the container's real `sh -c` command with python swapped for an argv printer."""
    shell, flag, script, argv0 = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    module = script.split("python -m ", 1)[1].split()[0]  # a subcommand after it stays in argv
    script = script.replace(manifest.POD_CIDRS_FILE, str(cidrs_file)).replace(
        f"python -m {module}", f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'")
    out = subprocess.run([shell, flag, script, argv0, *_kubelet_expand(container["args"])],
                         capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout)


def test_manifests_agent_command_parses_with_the_agent_parser(tmp_path: Path) -> None:
    cidrs = tmp_path / "pod-cidrs"
    cidrs.write_text("10.42.1.0/24,fd00:42:1::/64")
    spec = _pod_spec("DaemonSet", apply_sets(InstallValues(), ["agentWorkers=3", "opaquePorts=3306,5432"]))
    argv = _run_wrapper(_container(spec, "agent"), cidrs)
    config = agent_config(agent_parser().parse_args(argv))
    assert config.node == "node-a" and config.node_ip == "192.0.2.10"
    assert config.pod_cidrs == ("10.42.1.0/24", "fd00:42:1::/64")
    assert config.controller == "nodemesh-controller.nodemesh.svc.cluster.local:8085"
    assert config.token_file == f"{manifest.TOKEN_DIR}/token"
    assert (config.workers, config.opaque_ports, config.drain_grace_s) == (3, (3306, 5432), 30.0)
    mounts = {m["mountPath"] for m in _container(spec, "agent")["volumeMounts"]}
    assert manifest.TOKEN_DIR in mounts and os.path.dirname(manifest.POD_CIDRS_FILE) in mounts


def test_manifests_redirector_command_parses_with_the_redirector_parser(tmp_path: Path) -> None:
    cidrs = tmp_path / "pod-cidrs"
    cidrs.write_text("10.42.1.0/24")
    spec = _pod_spec("DaemonSet", apply_sets(InstallValues(), ["skippedPorts=22,2379"]))
    redirector = _container(spec, "redirector")
    argv = _run_wrapper(redirector, cidrs)
    assert argv[0] == "run"  # `python -m nodemesh.redirector run`
    args = _parser().parse_args(argv)
    config = _capture_config(args)
    assert config.node_ip == "192.0.2.10" and config.pod_cidrs == ("10.42.1.0/24",)
    assert tuple(config.skip_ports or ()) == (22, 2379)
    assert (args.agent_admin, args.grace) == ("http://127.0.0.1:4191", 2.0)
    assert os.path.dirname(manifest.POD_CIDRS_FILE) in {m["mountPath"] for m in redirector["volumeMounts"]}


def test_manifests_fail_open_init_container_runs_first_and_parses() -> None:
    spec = _pod_spec("DaemonSet")
    assert [c["name"] for c in spec["initContainers"]] == ["fail-open", "node-sysctls", "pod-cidrs"]
    init = _container(spec, "fail-open")
    assert init["command"][:3] == ["python", "-m", "nodemesh.redirector"]
    args = _parser().parse_args(init["command"][3:])
    assert args.verb == "fail-open" and args.agent_admin == "http://127.0.0.1:4191"
    _capture_config(args, required=False)  # needs neither the node IP nor the pod CIDRs
    assert set(init["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert "/run/xtables.lock" in {m["mountPath"] for m in init["volumeMounts"]}


def test_manifests_controller_command_parses_with_the_controller_parser() -> None:
    values = apply_sets(InstallValues(), ["excludedNamespaces=kube-system,monitoring", "skippedPorts=22",
                                          "tapMaxRps=25", "opaquePorts=6379"])
    controller = _container(_pod_spec("Deployment", values), "controller")
    assert controller["command"] == ["python", "-m", "nodemesh.controlplane"]
    config = controller_args(controller["args"])
    assert config.source == "kubernetes" and config.kubeconfig == ""  # in-cluster
    assert config.listen == "0.0.0.0"  # reachable through its Service and by the kubelet's probes
    assert (config.grpc_port, config.web_port) == (8085, 8084)
    assert config.excluded_namespaces == ("kube-system", "monitoring", "nodemesh")
    assert (config.opaque_ports, config.tap_max_rps) == ((6379,), 25.0)
    assert "--skip-ports" not in controller["args"]  # the redirector's flag: the controller had no use for it


def test_manifests_controller_pod_carries_the_label_the_cli_selects() -> None:
    from nodemesh.cli.client import CONTROLLER_LABEL, CONTROLLER_NAMESPACE

    docs = [d for d in yaml.safe_load_all(render_daemonset()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    key, _, value = CONTROLLER_LABEL.partition("=")
    assert deployment["spec"]["template"]["metadata"]["labels"][key] == value
    assert deployment["metadata"]["namespace"] == CONTROLLER_NAMESPACE


# ---------------------------------------------------------------------------- the init container

class _FakeApiServer(BaseHTTPRequestHandler):
    nodes: ClassVar[dict[str, dict[str, Any]]] = {}
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        name = self.path.removeprefix("/api/v1/nodes/")
        node = self.nodes.get(name)
        body = json.dumps(node if node else {"kind": "Status", "code": 404, "reason": "NotFound"}).encode()
        self.send_response(200 if node else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[Path]:
    """A local HTTP server answering GET /api/v1/nodes/NAME, and a kubeconfig pointing at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "test", "user": {"token": "t"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        _FakeApiServer.nodes, _FakeApiServer.seen = {}, []


def _run_init(tmp_path: Path, kubeconfig: Path | None, pod_cidrs: str = "",
              node: str = "node-a") -> tuple[subprocess.CompletedProcess[str], Path]:
    init = _container(_pod_spec("DaemonSet"), "pod-cidrs")
    out = tmp_path / "pod-cidrs"
    env = {"PATH": os.environ["PATH"], "NODE_NAME": node, "POD_CIDRS": pod_cidrs, "POD_CIDRS_FILE": str(out),
           "HOME": str(tmp_path)}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    _python, flag, script = init["command"]
    proc = subprocess.run([sys.executable, flag, script], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    return proc, out


def test_manifests_init_container_reads_pod_cidrs_from_the_node(tmp_path: Path, api_server: Path) -> None:
    _FakeApiServer.nodes["node-a"] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                                      "spec": {"podCIDR": "10.42.1.0/24",
                                               "podCIDRs": ["10.42.1.0/24", "fd00:42:1::/64"]}}
    proc, out = _run_init(tmp_path, api_server)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "10.42.1.0/24,fd00:42:1::/64"
    assert _FakeApiServer.seen == ["/api/v1/nodes/node-a"]


def test_manifests_init_container_falls_back_to_the_single_pod_cidr(tmp_path: Path, api_server: Path) -> None:
    _FakeApiServer.nodes["node-a"] = {"kind": "Node", "spec": {"podCIDR": "10.244.0.0/24"}}
    proc, out = _run_init(tmp_path, api_server)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "10.244.0.0/24"


def test_manifests_init_container_fails_clearly_without_pod_cidrs(tmp_path: Path, api_server: Path) -> None:
    _FakeApiServer.nodes["node-a"] = {"kind": "Node", "spec": {}}
    proc, out = _run_init(tmp_path, api_server)
    assert proc.returncode != 0 and "podCidrs" in proc.stderr
    assert not out.exists()


def test_manifests_init_container_override_needs_no_api(tmp_path: Path) -> None:
    proc, out = _run_init(tmp_path, None, pod_cidrs="192.168.0.0/16")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "192.168.0.0/16"


def test_manifests_pod_cidrs_override_is_rendered_and_validated() -> None:
    init = _container(_pod_spec("DaemonSet", apply_sets(InstallValues(), ["podCidrs=192.168.0.0/16"])),
                      "pod-cidrs")
    assert {"name": "POD_CIDRS", "value": "192.168.0.0/16"} in init["env"]
    with pytest.raises(manifest.ManifestError, match="podCidrs"):
        apply_sets(InstallValues(), ["podCidrs=192.168.0.1/16"])


def test_manifests_redirector_keeps_the_return_path_as_long_as_the_agent_drains(tmp_path: Path) -> None:
    """The redirector keeps the return path at shutdown while the agent still carries captured
    connections; with a longer drainGraceSeconds it must wait that long too (it stopped at a fixed
    35 s and cut the replies of requests the agent was still draining), within the pod's grace."""
    from nodemesh.redirector.cli import _runner_config

    cidrs = tmp_path / "pod-cidrs"
    cidrs.write_text("10.42.1.0/24")
    for drain in (30, 120):
        values = apply_sets(InstallValues(), [f"drainGraceSeconds={drain}"])
        spec = _pod_spec("DaemonSet", values)
        args = _parser().parse_args(_run_wrapper(_container(spec, "redirector"), cidrs))
        runner = _runner_config(args, _capture_config(args))
        assert drain < runner.shutdown_wait_s < spec["terminationGracePeriodSeconds"]


def test_manifests_node_sysctls_init_container_parses() -> None:
    init = _container(_pod_spec("DaemonSet"), "node-sysctls")
    python, flag, module, *rest = init["command"]
    assert (python, flag, module) == ("python", "-m", "nodemesh.redirector")
    assert _parser().parse_args(rest).verb == "sysctls"


def test_manifests_mtls_renders_the_ca_the_certificates_and_the_tunnel(tmp_path: Path) -> None:
    """`nodemesh install --mtls` (= --set mtls=true): the controller keeps the workload root in its
    Secret (a Role for that Secret only), the agents keep their pods' keys in a memory emptyDir and
    tunnel; the flags parse with the real parsers. Off by default (the committed manifests)."""
    from click.testing import CliRunner
    from nodemesh.cli.main import cli

    out = CliRunner().invoke(cli, ["install", "--mtls", "--set", "mtlsRequiredNamespaces=payments,shop"])
    assert out.exit_code == 0, out.output
    docs = [d for d in yaml.safe_load_all(out.output) if d]
    values = apply_sets(InstallValues(), ["mtls=true", "mtlsRequiredNamespaces=payments,shop"])
    assert out.output == render_daemonset(values)
    controller = _container(_pod_spec("Deployment", values), "controller")
    config = controller_args(controller["args"])
    assert config.ca_secret == "nodemesh/nodemesh-workload-ca"
    assert config.mtls_required_namespaces == ("payments", "shop")
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "nodemesh-controller-workload-ca"]
    assert role["metadata"]["namespace"] == "nodemesh"
    # get/update on that one name and nothing else: the Secret ships empty, so no `create`
    # (which RBAC cannot narrow to a name) is granted.
    assert role["rules"] == [{"resources": ["secrets"], "resourceNames": ["nodemesh-workload-ca"],
                              "verbs": ["get", "update"], "apiGroups": [""]}]
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "nodemesh-workload-ca"]
    assert secret["metadata"]["namespace"] == "nodemesh" and "data" not in secret
    assert any(d["kind"] == "RoleBinding" and d["roleRef"]["name"] == role["metadata"]["name"] for d in docs)

    cidrs = tmp_path / "pod-cidrs"
    cidrs.write_text("10.42.1.0/24")
    spec = _pod_spec("DaemonSet", values)
    agent = agent_config(agent_parser().parse_args(_run_wrapper(_container(spec, "agent"), cidrs)))
    assert agent.mtls and agent.cert_dir == manifest.CERT_DIR
    assert {"name": "workload-certs", "mountPath": manifest.CERT_DIR} in _container(spec, "agent")["volumeMounts"]
    assert {"name": "workload-certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}} in spec["volumes"]

    default = render_daemonset()
    assert "--mtls" not in default and "workload-ca" not in default and "workload-certs" not in default


def test_manifests_controller_tls_is_on_by_default_with_minimal_rbac(tmp_path: Path) -> None:
    """The committed manifest: the controller provisions its own TLS (CA in the Secret, its
    certificate in the ConfigMap; both shipped empty, so the Role grants only get/update on those
    two names and no create), probes its web port over HTTPS; agents mount the ConfigMap
    (optional) and verify the controller with it. `--set controllerTls=false` removes all of it."""
    docs = [d for d in yaml.safe_load_all(render_daemonset()) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == manifest.CONTROLLER_TLS_SECRET and "data" not in secret
    ca_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == manifest.CONTROLLER_CA_CONFIGMAP)
    assert "data" not in ca_map
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "nodemesh-controller-tls"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["nodemesh-controller-tls"],
         "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["nodemesh-controller-ca"],
         "verbs": ["get", "update"]}]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "nodemesh-controller-tls"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nodemesh-controller", "namespace": "nodemesh"}]
    # Nothing else of the mesh may create or write Secrets or ConfigMaps.
    for doc in docs:
        for rule in doc.get("rules", []):
            if {"secrets", "configmaps"} & set(rule["resources"]):
                assert doc is role and "create" not in rule["verbs"] and rule.get("resourceNames")

    controller = _container(_pod_spec("Deployment"), "controller")
    config = controller_args(controller["args"])
    assert (config.tls_ca_secret, config.tls_ca_configmap) == ("nodemesh/nodemesh-controller-tls",
                                                               "nodemesh/nodemesh-controller-ca")
    assert not config.tls_cert and not config.tls_hosts  # names: the Service's in $POD_NAMESPACE
    assert controller["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert controller["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"

    cidrs = tmp_path / "pod-cidrs"
    cidrs.write_text("10.42.1.0/24")
    spec = _pod_spec("DaemonSet")
    agent = agent_config(agent_parser().parse_args(_run_wrapper(_container(spec, "agent"), cidrs)))
    assert agent.controller_ca == f"{manifest.CONTROLLER_CA_DIR}/ca.crt"
    assert {"name": "controller-ca", "mountPath": manifest.CONTROLLER_CA_DIR, "readOnly": True} in \
        _container(spec, "agent")["volumeMounts"]
    assert {"name": "controller-ca", "configMap": {"name": "nodemesh-controller-ca", "optional": True}} in spec["volumes"]
    # The agent dials the Service by a name the serving certificate carries.
    host = agent.controller.rsplit(":", 1)[0]
    assert host in service_hosts("nodemesh-controller", "nodemesh")

    off = render_daemonset(apply_sets(InstallValues(), ["controllerTls=false"]))
    assert "nodemesh-controller-tls" not in off and "controller-ca" not in off and "HTTPS" not in off
    moved = render_daemonset(apply_sets(InstallValues(), ["namespace=mesh-system"]))
    assert "mesh-system/nodemesh-controller-tls" in moved and "mesh-system/nodemesh-controller-ca" in moved

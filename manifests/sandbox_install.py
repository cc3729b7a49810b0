"""`nodemesh install --sandbox` / `uninstall --sandbox`: what the DaemonSet does, on sandbox nodes.

Two ways, same agent, redirector and controller code:

* node processes (the default): on every node of a running sandbox this starts, as supervised
  hostNetwork processes inside the node's network namespace, the agent and then the redirector
  (which captures only once the agent is ready); the controller runs once, on the first node,
  reading the sandbox's objects file. Uninstall goes the other way: redirectors first (they remove
  the capture, so pods talk directly again), then the agents and the controller.
* `as_pods=True` (`--as-pods`): the manifests `nodemesh install` prints for Kubernetes, applied to
  the sandbox and run by its kubelet, as a real node runs them — the controller a pod of the mesh's
  namespace on the pod network (list+watch and TokenReview against the sandbox's API server, a
  hostNetwork pod behind `default/kubernetes`), the agent and redirector one hostNetwork DaemonSet
  pod per node (init container, projected token, rolling updates, node restarts). One change: the
  controller reads the API server from its pod's kubeconfig instead of the in-cluster config (which
  the sandbox cannot mount). The CLI reaches the controller through a port-forward on node1.

Both are idempotent, and the app keeps serving across both.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import grpc
from nodemesh.api.certs import CA_FILE, CERT_FILE, KEY_FILE, ControllerPki, write_controller_pki
from nodemesh.api.channel import controller_channel
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import ADMIN_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_WEB_PORT
from nodemesh.manifests.render import (
    CLI_NAME,
    CONTROLLER_AUDIENCE,
    CONTROLLER_CA_CONFIGMAP,
    CONTROLLER_NAME,
    InstallValues,
    apply_sets,
    daemonset_documents,
    dump_documents,
)
from nodemesh.manifests.sandboxfiles import (
    CONTROLLER_ADDR_FILE,
    DASHBOARD_ADDR_FILE,
    SERVER_NAME_FILE,
    TOKEN_FILE,
    first_token,
    sandbox_ca,
    sandbox_server_name,
    write_controller_address,
    write_dashboard_address,
)
from nodemesh.redirector.plan import hook_present
from nodemesh.sandbox import cgroups

CONTROLLER_PROCESS = "nodemesh-controller"
PORT_FORWARD_PROCESS = "nodemesh-port-forward"
# What --as-pods applied (uninstall deletes exactly this).
PODS_MANIFEST_FILE = "nodemesh-install.yaml"
CLI_TOKEN_TTL_S = 30 * 24 * 3600


def agent_process(node: str) -> str:
    return f"nodemesh-agent-{node}"


def redirector_process(node: str) -> str:
    return f"nodemesh-redirector-{node}"


class InstallError(click.ClickException):
    """A step of the sandbox install failed; the message names the step and the log to read."""


def _sandbox(name: str | None):  # -> Sandbox, imported lazily (pyroute2)
    from nodemesh.sandbox.cluster import Sandbox, SandboxError

    sb = Sandbox(name) if name else Sandbox()
    if not sb.is_up():
        raise InstallError(f"sandbox {sb.name!r} is not up: run `nodemesh sandbox up` first")
    del SandboxError
    return sb


def _stat_backend_args(sets: tuple[str, ...]) -> list[str]:
    values = apply_sets(InstallValues(), sets)
    return [*(["--prometheus-url", values.prometheusUrl] if values.prometheusUrl else []),
            *(["--stat-backend", values.statBackend] if values.statBackend != "memory" else []),
            *(["--no-ingest"] if not values.ingest else [])]


def install_sandbox(name: str | None = None, workers: int = 1, timeout: float = 30.0,
                    progress: Callable[[str], None] | None = None, *, as_pods: bool = False,
                    sets: tuple[str, ...] = (), mtls: bool = False, cert_ttl_s: float = 0.0,
                    mtls_required: tuple[str, ...] = (), capture: str = "iptables",
                    accelerate: str = "none", tunnel_mux: bool = True) -> str:
    """Install the mesh on a running sandbox; returns the controller's host:port. `sets` (--set
    key=value, as for `nodemesh install`) apply with `as_pods`; without it only prometheusUrl,
    statBackend and ingest do (the controller's stat backend, controlplane/promstore.py). The controller is the
    mesh's CA (root in `<state>/workload-ca`) and every agent holds its pods' workload certificates
    (`<state>/certs/<node>`); `mtls`: cross-node pod traffic goes agent to agent over mTLS;
    `cert_ttl_s` (tests): the workload certificates' lifetime instead of the controller's 24 h;
    `mtls_required`: namespaces taking cross-node connections only over mTLS (fail closed);
    `tunnel_mux=False`: the agents' `--no-tunnel-mux` (a TLS session per connection, agent/mux.py).
    `capture="ebpf"`: outbound capture by cgroup/connect4 programs in each pod's cgroup
    (redirector/ebpf.py; the sandbox's per-node cgroup and bpffs directories, sandbox/cgroups.py).
    `accelerate="sockmap"`: redirector/sockmap.py on every node; the agent then runs in a cgroup
    below the node's (`<node>/agent`), as a DaemonSet pod sits below kubepods, so the sock_ops
    program attached at the node's cgroup sees its sockets too."""
    say = progress or (lambda msg: click.echo(msg, err=True))
    sb = _sandbox(name)
    if as_pods:
        if capture != "iptables":
            sets = (*sets, f"capture={capture}")
        if accelerate != "none":
            sets = (*sets, f"accelerate={accelerate}")
        return _install_as_pods(sb, workers, timeout, say, sets)
    nodes = sb.nodes()
    state_dir = Path(sb.state_dir)
    token_path = state_dir / TOKEN_FILE
    if not token_path.exists():
        token_path.write_text(secrets.token_urlsafe(32) + "\n")
        token_path.chmod(0o600)
    controller_host = sb.controller_address
    controller = f"{controller_host}:{CONTROLLER_GRPC_PORT}"
    # The controller speaks TLS: agents on other nodes send their token across the node-to-node
    # link. Made once, like the token (a re-install must not change what a running controller serves).
    pki = ControllerPki(state_dir / CA_FILE, state_dir / CERT_FILE, state_dir / KEY_FILE)
    if not all(p.exists() for p in (pki.ca, pki.cert, pki.key)):
        pki = write_controller_pki(state_dir, [controller_host])
    py = sys.executable
    # The node processes run the nodemesh this process imports (a worktree on PYTHONPATH, not
    # whatever copy is pip-installed): the kubelet gives them a clean environment otherwise.
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None

    sb.start_node_process(nodes[0].name, CONTROLLER_PROCESS, [
        py, "-m", "nodemesh.controlplane", "--source", "sandbox", "--state-dir", str(state_dir),
        "--listen", "0.0.0.0", "--token-file", str(token_path), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
        *_stat_backend_args(sets),
        "--ca-dir", str(state_dir / "workload-ca"),
        *(["--workload-cert-ttl", str(cert_ttl_s)] if cert_ttl_s else []),
        *(["--mtls-required-namespaces", ",".join(mtls_required)] if mtls_required else []),
    ], env=env)

    def node_env(node: Any) -> dict[str, str] | None:
        if capture != "ebpf" and accelerate == "none":
            return env  # the agent reads the pins (/capture, check) only when there are some
        return {**(env or {}), "NODEMESH_BPF_DIR": cgroups.node_bpf_dir(sb.name, node.name)}

    def capture_args(node: Any) -> list[str]:
        where = ["--bpf-dir", cgroups.node_bpf_dir(sb.name, node.name),
                 "--cgroup-root", str(cgroups.node_cgroup(sb.name, node.name))]
        return [*(["--capture", "ebpf"] if capture == "ebpf" else []),
                *(["--accelerate", accelerate] if accelerate != "none" else []),
                *(where if capture == "ebpf" or accelerate != "none" else [])]

    def in_node_cgroup(node: Any, argv: list[str]) -> list[str]:
        if accelerate == "none":
            return argv
        path = cgroups.prepare_pod(sb.name, node.name, "-agent")
        if path is None:
            return argv   # no cgroup2 mount: the redirector's probe turns acceleration off
        return cgroups.join_argv(path, argv)

    for node in nodes:
        sb.start_node_process(node.name, agent_process(node.name), in_node_cgroup(node, [
            py, "-m", "nodemesh.agent", "--node", node.name, "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
            "--controller", controller, "--token-file", str(token_path), "--controller-ca", str(pki.ca),
            "--workers", str(workers), "--cert-dir", str(state_dir / "certs" / node.name),
            *(["--mtls"] if mtls else []), *(["--no-tunnel-mux"] if mtls and not tunnel_mux else []),
        ]), env=node_env(node))
    _wait(lambda: all(_agent_ready(sb, n.name) for n in nodes), timeout,
          "agents ready", [sb.node_process_log(n.name, agent_process(n.name)) for n in nodes])
    for node in nodes:
        sb.start_node_process(node.name, redirector_process(node.name), [
            py, "-m", "nodemesh.redirector", "run", "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
            "--agent-admin", f"http://127.0.0.1:{ADMIN_PORT}", "--agent-heartbeat", *capture_args(node),
        ], env=node_env(node))
    _write_addresses(state_dir, controller_host)
    _wait(lambda: _mesh_healthy(controller, token_path, {n.name for n in nodes}), timeout,
          "capture installed and agents reporting",
          [sb.node_process_log(nodes[0].name, CONTROLLER_PROCESS)]
          + [sb.node_process_log(n.name, redirector_process(n.name)) for n in nodes])
    say(f"nodemesh installed on sandbox {sb.name}: controller {controller}, {len(nodes)} agents")
    return controller


def uninstall_sandbox(name: str | None = None, progress: Callable[[str], None] | None = None) -> None:
    """Remove the mesh from a sandbox without failing a request, in the order a node needs:

    1. the redirectors get SIGTERM and take the capture hooks out at once: new connections go direct;
    2. once no node is hooked, the agents drain what they still carry and exit (the replies of their
       transparent upstream connections still come back through the return path, which each
       redirector keeps until its agent's captured connections are gone);
    3. the redirectors remove the return path and exit; the controller goes last.
    Whatever a killed redirector left behind is then removed with `nodemesh.redirector remove`.
    """
    say = progress or (lambda msg: click.echo(msg, err=True))
    sb = _sandbox(name)
    if (Path(sb.state_dir) / PODS_MANIFEST_FILE).exists():
        _uninstall_pods(sb)
        say(f"nodemesh removed from sandbox {sb.name}")
        return
    nodes = sb.nodes()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        redirectors = [pool.submit(sb.stop_node_process, n.name, redirector_process(n.name), 40.0) for n in nodes]
        _wait(lambda: all(f.done() for f in redirectors) or not any(_capture_hooked(sb, n.name) for n in nodes),
              15.0, "capture hooks removed", [sb.node_process_log(n.name, redirector_process(n.name)) for n in nodes])
        for node in nodes:
            sb.stop_node_process(node.name, agent_process(node.name), timeout=40.0)
        for f in redirectors:
            f.result()
    for node in nodes:
        # A killed redirector's eBPF pins (capture's, acceleration's) go with its rules.
        bpf_dir = cgroups.node_bpf_dir(sb.name, node.name)
        if _rules_left(sb, node.name) or os.path.isdir(bpf_dir) or os.path.isdir(bpf_dir + "-sockmap"):
            sb.node_exec(node.name, [sys.executable, "-m", "nodemesh.redirector", "remove", "--node-ip", node.ip,
                                     "--pod-cidr", node.pod_cidr, "--bpf-dir", bpf_dir,
                                     "--cgroup-root", str(cgroups.node_cgroup(sb.name, node.name))],
                         check=True, capture_output=True, timeout=30)
    sb.stop_node_process(nodes[0].name, CONTROLLER_PROCESS)
    (Path(sb.state_dir) / CONTROLLER_ADDR_FILE).unlink(missing_ok=True)
    (Path(sb.state_dir) / DASHBOARD_ADDR_FILE).unlink(missing_ok=True)
    say(f"nodemesh removed from sandbox {sb.name}")


def sandbox_documents(values: InstallValues) -> list[dict[str, Any]]:
    """The Kubernetes install (manifests/render.py) as the sandbox's kubelet runs it. Everything is
    as rendered for a cluster except: the controller reads its API server from the kubeconfig the
    sandbox gives every pod (`$(KUBECONFIG)`), not from the in-cluster configuration, whose fixed
    paths and TLS the sandbox cannot provide."""
    docs = daemonset_documents(values)
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == CONTROLLER_NAME:
            container = doc["spec"]["template"]["spec"]["containers"][0]
            args: list[str] = []
            for arg in container["args"]:
                args += ["--kubeconfig", "$(KUBECONFIG)"] if arg == "--in-cluster" else [arg]
            container["args"] = args
    return docs


def _install_as_pods(sb: Any, workers: int, timeout: float, say: Callable[[str], None],
                     sets: tuple[str, ...]) -> str:
    from nodemesh.sandbox import tokens

    values = apply_sets(InstallValues(agentWorkers=workers), sets)
    # The controller's self-provisioned TLS (on by default for Kubernetes) is opt-in here, with
    # `--set controllerTls=true`: the existing --as-pods tests and tools speak plaintext to it.
    explicit_tls = any(a.replace(" ", "").lower() in ("controllertls=true", "controllertls=1") for a in sets)
    values = replace(values, controllerTls=explicit_tls)
    nodes = sb.nodes()
    state_dir = Path(sb.state_dir)
    sb.ensure_api_server(timeout=timeout)
    # The manifest's controller serves the API without TLS in the sandbox (no in-cluster PKI
    # here, docs/sandbox.md): a CA left by a node-process install would make clients expect TLS.
    for name in (CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME_FILE):
        (state_dir / name).unlink(missing_ok=True)
    text = dump_documents(sandbox_documents(values), "# nodemesh install --sandbox --as-pods\n")
    (state_dir / PODS_MANIFEST_FILE).write_text(text)
    sb.apply(text=text)
    # `kubectl create token nodemesh-cli --audience nodemesh-controller`, for the CLI and the tests.
    token = tokens.mint(state_dir, values.namespace, CLI_NAME, [CONTROLLER_AUDIENCE], CLI_TOKEN_TTL_S)
    token_path = state_dir / TOKEN_FILE
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    controller_host = sb.controller_address
    sb.start_node_process(nodes[0].name, PORT_FORWARD_PROCESS, [
        sys.executable, "-m", "nodemesh.sandbox.portforward", "--cluster", sb.name, "--state-dir", str(state_dir),
        "--namespace", values.namespace, "--selector", f"app={CONTROLLER_NAME}", "--listen", controller_host,
        "--port", str(CONTROLLER_GRPC_PORT), "--port", str(CONTROLLER_WEB_PORT),
    ])
    _write_addresses(state_dir, controller_host)
    controller = f"{controller_host}:{CONTROLLER_GRPC_PORT}"
    if values.controllerTls:
        # The CA the controller published (what the CLI reads from the ConfigMap on a cluster),
        # for the CLI and the check below; the certificate names the Service, not node1's address.
        _wait(lambda: _published_ca(sb, values.namespace, state_dir), timeout, "the controller's CA published",
              [state_dir / "logs"])
    _wait(lambda: _mesh_healthy(controller, token_path, {n.name for n in nodes}), timeout,
          "controller, agents and capture ready", [Path(sb.state_dir) / "logs"])
    say(f"nodemesh installed on sandbox {sb.name} as pods: controller {controller} (port-forward), "
        f"{len(nodes)} agents")
    return controller


def _published_ca(sb: Any, namespace: str, state_dir: Path) -> bool:
    cm = next((o for o in sb.objects().of_kind("ConfigMap") if o["metadata"]["name"] == CONTROLLER_CA_CONFIGMAP
               and o["metadata"].get("namespace") == namespace), None)
    pem = ((cm or {}).get("data") or {}).get("ca.crt", "")
    if "BEGIN CERTIFICATE" not in pem:
        return False
    (state_dir / CA_FILE).write_text(pem)
    (state_dir / SERVER_NAME_FILE).write_text(f"{CONTROLLER_NAME}.{namespace}.svc\n")
    return True


def _uninstall_pods(sb: Any) -> None:
    """`kubectl delete -f`: the kubelet stops the DaemonSet's pods with their grace period, and each
    redirector removes its node's rules on the way out (rules left by a killed one are removed)."""
    state_dir = Path(sb.state_dir)
    text = (state_dir / PODS_MANIFEST_FILE).read_text()
    sb.delete(text=text, ignore_not_found=True)
    nodes = sb.nodes()
    _wait(lambda: not any(_rules_left(sb, n.name) for n in nodes) and not _mesh_processes_left(sb),
          60.0, "mesh pods stopped and capture removed", [state_dir / "logs"], fail=False)
    for node in nodes:
        if _rules_left(sb, node.name):
            sb.node_exec(node.name, [sys.executable, "-m", "nodemesh.redirector", "remove", "--node-ip", node.ip,
                                     "--pod-cidr", node.pod_cidr], check=True, capture_output=True, timeout=30)
    sb.stop_node_process(nodes[0].name, PORT_FORWARD_PROCESS)
    for name in (CONTROLLER_ADDR_FILE, DASHBOARD_ADDR_FILE, PODS_MANIFEST_FILE, CA_FILE, SERVER_NAME_FILE):
        (state_dir / name).unlink(missing_ok=True)


def _mesh_processes_left(sb: Any) -> bool:
    """Does the kubelet still run a container of a pod that is gone (one draining)?"""
    from nodemesh.sandbox.state import read_json

    live = {p["metadata"]["uid"] for p in sb.pods()}
    pids = read_json(Path(sb.state_dir) / "runtime.json", {}).get("pids", {})
    return any(key.startswith("pod/") and key.split("/")[1] not in live for key in pids)


def _nat_save(sb, node: str) -> str:
    return sb.node_exec(node, ["iptables-save", "-t", "nat"], capture_output=True, text=True, timeout=10).stdout


def _capture_hooked(sb, node: str) -> bool:
    """nat PREROUTING still jumps to the redirector's chain (read-only)."""
    return hook_present(_nat_save(sb, node))


def _rules_left(sb, node: str) -> bool:
    saved = sb.node_exec(node, ["iptables-save"], capture_output=True, text=True, timeout=10).stdout
    rules = sb.node_exec(node, ["ip", "-4", "rule"], capture_output=True, text=True, timeout=10).stdout
    return "NODEMESH" in saved or "nodemesh:" in saved or "lookup 4140" in rules


def _agent_ready(sb, node: str) -> bool:
    res = sb.node_exec(node, ["python3", "-c", _READY_PROBE], capture_output=True, timeout=5)
    return res.returncode == 0


_READY_PROBE = (
    "import sys, urllib.request\n"
    f"sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}/ready', timeout=1).status == 200 else 1)"
)


def _write_addresses(state_dir: Path, controller_host: str) -> None:
    """Where the CLI finds the controller (gRPC) and `nodemesh dashboard` its web port."""
    write_controller_address(state_dir, controller_host, CONTROLLER_GRPC_PORT)
    write_dashboard_address(state_dir, controller_host, CONTROLLER_WEB_PORT)


def _mesh_healthy(controller: str, token_path: Path, nodes: set[str]) -> bool:
    """The controller's `Check` (what `nodemesh check` asks): every node's agent connected, ready,
    and its capture installed."""
    token = first_token(token_path.read_text())
    with controller_channel(controller, sandbox_ca(token_path.parent), sandbox_server_name(token_path.parent)) as channel:
        try:
            resp = pb_grpc.ControllerStub(channel).Check(
                pb.CheckRequest(), timeout=2.0, metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError:
            return False
    healthy = {n.node for n in resp.nodes if n.agent_connected and n.agent_ready and n.capture_installed}
    return nodes <= healthy


def _probe(predicate: Callable[[], bool]) -> bool:
    try:
        return predicate()
    except Exception:  # noqa: BLE001 - a probe that fails is "not yet"
        return False


def _wait(predicate: Callable[[], bool], timeout: float, step: str, logs: list[Path], fail: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _probe(predicate):
            return
        time.sleep(0.2)
    if fail:
        raise InstallError(f"{step}: not reached within {timeout:.0f}s; see {', '.join(map(str, logs))}")

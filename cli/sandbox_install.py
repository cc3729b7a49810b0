"""`nodemesh install --sandbox` / `uninstall --sandbox`: what the DaemonSet does, on sandbox nodes.

On every node of a running sandbox this starts, as supervised hostNetwork processes inside the
node's network namespace, the agent and then the redirector (which captures only once the
agent is ready); the controller runs once, on the first node. Uninstall goes the other way:
redirectors first (they remove the capture, so pods talk directly again), then the agents and
the controller. Both are idempotent, and the app keeps serving across both.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import ADMIN_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_WEB_PORT
from nodemesh.cli.client import CONTROLLER_ADDR_FILE, ClientConfig, CliError, connect, write_sandbox_address
from nodemesh.cli.dashboard import DASHBOARD_ADDR_FILE, write_dashboard_address
from nodemesh.redirector.plan import hook_present

CONTROLLER_PROCESS = "nodemesh-controller"
TOKEN_FILE = "controller.token"


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


def install_sandbox(name: str | None = None, workers: int = 1, timeout: float = 30.0,
                    progress: Callable[[str], None] | None = None) -> str:
    """Install the mesh on a running sandbox; returns the controller's host:port."""
    say = progress or (lambda msg: click.echo(msg, err=True))
    sb = _sandbox(name)
    nodes = sb.nodes()
    state_dir = Path(sb.state_dir)
    token_path = state_dir / TOKEN_FILE
    if not token_path.exists():
        token_path.write_text(secrets.token_urlsafe(32) + "\n")
        token_path.chmod(0o600)
    controller_host = sb.controller_address
    controller = f"{controller_host}:{CONTROLLER_GRPC_PORT}"
    py = sys.executable
    # The node processes run the nodemesh this process imports (a worktree on PYTHONPATH, not
    # whatever copy is pip-installed): the kubelet gives them a clean environment otherwise.
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None

    sb.start_node_process(nodes[0].name, CONTROLLER_PROCESS, [
        py, "-m", "nodemesh.controlplane", "--source", "sandbox", "--state-dir", str(state_dir),
        "--listen", "0.0.0.0", "--token-file", str(token_path),
    ], env=env)
    for node in nodes:
        sb.start_node_process(node.name, agent_process(node.name), [
            py, "-m", "nodemesh.agent", "--node", node.name, "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
            "--controller", controller, "--token-file", str(token_path), "--workers", str(workers),
        ], env=env)
    _wait(lambda: all(_agent_ready(sb, n.name) for n in nodes), timeout,
          "agents ready", [sb.node_process_log(n.name, agent_process(n.name)) for n in nodes])
    for node in nodes:
        sb.start_node_process(node.name, redirector_process(node.name), [
            py, "-m", "nodemesh.redirector", "run", "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
            "--agent-admin", f"http://127.0.0.1:{ADMIN_PORT}",
        ], env=env)
    write_sandbox_address(state_dir, controller_host, CONTROLLER_GRPC_PORT)
    # `nodemesh dashboard` reads this beside controller.addr: the controller serves it on 8084.
    write_dashboard_address(state_dir, controller_host, CONTROLLER_WEB_PORT)
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
        if _rules_left(sb, node.name):
            sb.node_exec(node.name, [sys.executable, "-m", "nodemesh.redirector", "remove", "--node-ip", node.ip,
                                     "--pod-cidr", node.pod_cidr], check=True, capture_output=True, timeout=30)
    sb.stop_node_process(nodes[0].name, CONTROLLER_PROCESS)
    (Path(sb.state_dir) / CONTROLLER_ADDR_FILE).unlink(missing_ok=True)
    (Path(sb.state_dir) / DASHBOARD_ADDR_FILE).unlink(missing_ok=True)
    say(f"nodemesh removed from sandbox {sb.name}")


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


def _mesh_healthy(controller: str, token_path: Path, nodes: set[str]) -> bool:
    config = ClientConfig(controller=controller, token=token_path.read_text().strip(), timeout_s=2.0)
    try:
        with connect(config) as api:
            resp = api.unary("Check", pb.CheckRequest())
    except CliError:
        return False
    healthy = {n.node for n in resp.nodes if n.agent_connected and n.agent_ready and n.capture_installed}
    return nodes <= healthy


def _probe(predicate: Callable[[], bool]) -> bool:
    try:
        return predicate()
    except Exception:  # noqa: BLE001 - a probe that fails is "not yet"
        return False


def _wait(predicate: Callable[[], bool], timeout: float, step: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _probe(predicate):
            return
        time.sleep(0.2)
    raise InstallError(f"{step}: not reached within {timeout:.0f}s; see {', '.join(map(str, logs))}")
